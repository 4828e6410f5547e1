"""Models from the libraries people train with, in tiny random-init configurations, with example inputs.

Each builder returns ``(model, example_inputs)``: the model as its library builds
it from a config (defaults first: ``use_cache`` and the like are left as the
library sets them), and inputs shaped like a small training batch. Nothing is
downloaded. Used by ``benchmarks/zoo.py --zoo libraries`` and by the tests.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Built = tuple[torch.nn.Module, Any]

VOCAB = 128


def _ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length))


def _llama(name: str) -> Built:
    import transformers

    config_class = getattr(transformers, f"{name}Config")
    model_class = getattr(transformers, f"{name}ForCausalLM")
    config = config_class(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return model_class(config), {"input_ids": _ids()}


def gpt2() -> Built:
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return transformers.GPT2LMHeadModel(config), {"input_ids": _ids()}


def t5() -> Built:
    import transformers

    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(config), {"input_ids": _ids(), "decoder_input_ids": _ids(length=6)}


def whisper() -> Built:
    import transformers

    config = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=32, max_target_positions=32, decoder_start_token_id=0, pad_token_id=0,
        bos_token_id=0, eos_token_id=0,
    )
    features = torch.randn(2, 16, 64)  # (batch, mel bins, 2 * max_source_positions frames)
    return transformers.WhisperForConditionalGeneration(config), {
        "input_features": features, "decoder_input_ids": _ids(length=6)}


def wav2vec2(**options: Any) -> Built:
    """Wav2Vec2 for CTC; ``options`` change its config (``mask_time_prob=0.0`` turns SpecAugment off)."""
    import transformers

    config = transformers.Wav2Vec2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, **options,
    )
    return transformers.Wav2Vec2ForCTC(config), {"input_values": torch.randn(2, 800)}


def bert() -> Built:
    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3,
    )
    return transformers.BertForSequenceClassification(config), {"input_ids": _ids(),
                                                                 "attention_mask": torch.ones(2, 12, dtype=torch.long)}


def clip() -> Built:
    import transformers

    text = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=16)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8)
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    return transformers.CLIPModel(config), {"input_ids": _ids(length=8), "pixel_values": torch.randn(2, 3, 32, 32)}


def convnext() -> Built:
    import transformers

    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[2, 2], num_labels=3,
                                         num_stages=2, out_features=None)
    return transformers.ConvNextForImageClassification(config), torch.randn(2, 3, 32, 32)


def convnext_v2() -> Built:
    import transformers

    config = transformers.ConvNextV2Config(num_channels=3, hidden_sizes=[8, 16], depths=[2, 2], num_labels=3,
                                           num_stages=2)
    return transformers.ConvNextV2ForImageClassification(config), torch.randn(2, 3, 32, 32)


def swin() -> Built:
    import transformers

    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                     window_size=4, num_labels=3)
    return transformers.SwinForImageClassification(config), torch.randn(2, 3, 32, 32)


def sam_vision() -> Built:
    import transformers

    config = transformers.SamVisionConfig(
        hidden_size=32, output_channels=16, num_hidden_layers=4, num_attention_heads=2, image_size=64,
        patch_size=8, mlp_dim=64, window_size=4, global_attn_indexes=[1, 3],
    )
    return transformers.SamVisionModel(config), torch.randn(2, 3, 64, 64)


def mamba() -> Built:
    import transformers

    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2,
                                      expand=2, conv_kernel=4)
    return transformers.MambaForCausalLM(config), {"input_ids": _ids()}


def rwkv() -> Built:
    import transformers

    config = transformers.RwkvConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                     intermediate_size=64, context_length=32)
    return transformers.RwkvForCausalLM(config), {"input_ids": _ids()}


def unet2d() -> Built:
    import diffusers

    model = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    return model, (torch.randn(2, 3, 16, 16), torch.tensor([10, 500]))


def unet2d_condition() -> Built:
    import diffusers

    model = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    return model, (torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 5, 16))


def dit() -> Built:
    import diffusers

    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=10, norm_num_groups=4,
    )
    return model, {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([1, 5]),
                   "class_labels": torch.tensor([1, 2])}


def _yolo(config: str, task: str | None = None) -> Callable[[], Built]:
    def build() -> Built:
        from ultralytics.nn import tasks

        model_class = {
            None: tasks.DetectionModel, "segment": tasks.SegmentationModel, "pose": tasks.PoseModel,
            "rtdetr": tasks.RTDETRDetectionModel,
        }[task]
        return model_class(config, verbose=False), torch.randn(2, 3, 64, 64)

    return build


LIBRARY_MODELS: dict[str, Callable[[], Built]] = {
    "transformers/llama": lambda: _llama("Llama"),
    "transformers/qwen2": lambda: _llama("Qwen2"),
    "transformers/mistral": lambda: _llama("Mistral"),
    "transformers/gpt2": gpt2,
    "transformers/t5": t5,
    "transformers/whisper": whisper,
    "transformers/wav2vec2": wav2vec2,
    # SpecAugment (NumPy masks drawn in Wav2Vec2Model's own forward) off, as the error for the row above
    # suggests; LayerDrop stays on, so the encoder runs as one call of its own code.
    "transformers/wav2vec2-no-specaugment": lambda: wav2vec2(mask_time_prob=0.0),
    "transformers/bert": bert,
    "transformers/clip": clip,
    "transformers/convnext": convnext,
    "transformers/convnext_v2": convnext_v2,
    "transformers/swin": swin,
    "transformers/sam_vision": sam_vision,
    "transformers/mamba": mamba,
    "transformers/rwkv": rwkv,
    "diffusers/unet2d": unet2d,
    "diffusers/unet2d_condition": unet2d_condition,
    "diffusers/dit": dit,
    "ultralytics/yolo11n": _yolo("yolo11n.yaml"),
    "ultralytics/yolo11n-seg": _yolo("yolo11n-seg.yaml", "segment"),
    "ultralytics/yolo11n-pose": _yolo("yolo11n-pose.yaml", "pose"),
    "ultralytics/yolo26n": _yolo("yolo26n.yaml"),
    "ultralytics/rtdetr-l": _yolo("rtdetr-l.yaml", "rtdetr"),
}
