"""Models from the libraries people train with, in tiny random-init configurations, with example inputs.

Each entry of :data:`LIBRARY` builds the model as its library builds it from a
config (defaults first: ``use_cache`` and the like are left as the library sets
them) and makes inputs shaped like a training batch at a given batch size and
sequence length or resolution. :data:`LIBRARY_MODELS` gives ``(model,
example_inputs)`` at batch 2 and the first size; ``second_inputs(name)`` a batch of
3 at the second size (None where the model's own code fixes every size but the
batch: Whisper's encoder takes exactly its configured frames). Nothing is
downloaded. Used by ``benchmarks/zoo.py --zoo libraries`` and by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

Built = tuple[torch.nn.Module, Any]

VOCAB = 128
LENGTHS = (12, 17)  # the example's sequence length and a second one, for every token model


def _ids(batch: int = 2, length: int = LENGTHS[0]) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length))


def _tokens(batch: int, length: int) -> dict:
    return {"input_ids": _ids(batch, length)}


def _images(channels: int = 3) -> Callable[[int, int], torch.Tensor]:
    return lambda batch, size: torch.randn(batch, channels, size, size)


@dataclass(frozen=True)
class LibraryModel:
    """How to build one library model and make its inputs at a batch size and a size (length or resolution)."""

    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int, int], Any]
    sizes: tuple[int, int | None] = LENGTHS  # the example's size, and a second one (None: fixed by the model)

    def example(self) -> Built:
        return self.build(), self.inputs(2, self.sizes[0])

    def second(self) -> Any:
        return self.inputs(3, self.sizes[1]) if self.sizes[1] is not None else self.inputs(3, self.sizes[0])


# --- transformers -------------------------------------------------------------------------------------------------


def _causal_lm(name: str, **extra: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        config = getattr(transformers, f"{name}Config")(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **extra,
        )
        return getattr(transformers, f"{name}ForCausalLM")(config)

    return build


def _llama(name: str) -> Built:
    return LibraryModel(_causal_lm(name), _tokens).example()


def _opt() -> torch.nn.Module:
    import transformers

    config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    return transformers.OPTForCausalLM(config)


def _gpt2() -> torch.nn.Module:
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                                                n_positions=64))


def gpt2() -> Built:
    return LibraryModel(_gpt2, _tokens).example()


def _encoder_classifier(name: str, **config: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        return getattr(transformers, f"{name}ForSequenceClassification")(
            getattr(transformers, f"{name}Config")(vocab_size=VOCAB, num_labels=3, **config))

    return build


_BERT_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   max_position_embeddings=64)


def _masked(batch: int, length: int) -> dict:
    return {"input_ids": _ids(batch, length), "attention_mask": torch.ones(batch, length, dtype=torch.long)}


def _t5() -> torch.nn.Module:
    import transformers

    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config)


def _bart() -> torch.nn.Module:
    import transformers

    config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64)
    return transformers.BartForConditionalGeneration(config)


def _seq2seq(batch: int, length: int) -> dict:
    return {"input_ids": _ids(batch, length), "decoder_input_ids": _ids(batch, length // 2)}


def _whisper() -> torch.nn.Module:
    import transformers

    config = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=32, max_target_positions=32, decoder_start_token_id=0, pad_token_id=0,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.WhisperForConditionalGeneration(config)


def _whisper_inputs(batch: int, length: int) -> dict:
    # (batch, mel bins, 2 * max_source_positions frames): the encoder takes exactly this many frames.
    return {"input_features": torch.randn(batch, 16, 64), "decoder_input_ids": _ids(batch, length // 2)}


def wav2vec2(**options: Any) -> Built:
    """Wav2Vec2 for CTC; ``options`` change its config (``mask_time_prob=0.0`` turns SpecAugment off)."""
    return _wav2vec2_entry(**options).example()


def _wav2vec2_entry(**options: Any) -> LibraryModel:
    def build() -> torch.nn.Module:
        import transformers

        config = transformers.Wav2Vec2Config(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2, **options,
        )
        return transformers.Wav2Vec2ForCTC(config)

    return LibraryModel(build, lambda batch, samples: {"input_values": torch.randn(batch, samples)}, (800, 1120))


def _clip() -> torch.nn.Module:
    import transformers

    text = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=16)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8)
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    return transformers.CLIPModel(config)


def _clip_inputs(batch: int, length: int) -> dict:
    # CLIP's vision tower fixes its position table to the configured image size; the text length varies.
    return {"input_ids": _ids(batch, length), "pixel_values": torch.randn(batch, 3, 32, 32)}


def _vision(name: str, model: str, **config: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        return getattr(transformers, model)(getattr(transformers, f"{name}Config")(**config))

    return build


def _mamba() -> torch.nn.Module:
    import transformers

    config = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2,
                                      expand=2, conv_kernel=4)
    return transformers.MambaForCausalLM(config)


def mamba() -> Built:
    return LibraryModel(_mamba, _tokens).example()


def _rwkv() -> torch.nn.Module:
    import transformers

    config = transformers.RwkvConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                                     intermediate_size=64, context_length=32)
    return transformers.RwkvForCausalLM(config)


# --- diffusers ----------------------------------------------------------------------------------------------------


def _unet2d() -> torch.nn.Module:
    import diffusers

    return diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def _unet2d_condition() -> torch.nn.Module:
    import diffusers

    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )


def _timesteps(batch: int) -> torch.Tensor:
    return torch.randint(1, 1000, (batch,))


def _dit() -> torch.nn.Module:
    import diffusers

    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=10, norm_num_groups=4,
    )


# --- ultralytics --------------------------------------------------------------------------------------------------


def _yolo(config: str, task: str | None = None) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from ultralytics.nn import tasks

        model_class = {
            None: tasks.DetectionModel, "segment": tasks.SegmentationModel, "pose": tasks.PoseModel,
            "rtdetr": tasks.RTDETRDetectionModel,
        }[task]
        return model_class(config, verbose=False)

    return build


# --- other libraries ----------------------------------------------------------------------------------------------


def _transformer_wrapper() -> torch.nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(num_tokens=VOCAB, max_seq_len=64, attn_layers=Decoder(dim=32, depth=2, heads=2))


def _ft_transformer() -> torch.nn.Module:
    from rtdl_revisiting_models import FTTransformer

    return FTTransformer(
        n_cont_features=3, cat_cardinalities=[4, 5], d_out=1, n_blocks=2, d_block=32, attention_n_heads=4,
        attention_dropout=0.1, ffn_d_hidden=None, ffn_d_hidden_multiplier=4 / 3, ffn_dropout=0.1,
        residual_dropout=0.0,
    )


def _tabular(batch: int, _: int) -> tuple:
    return torch.randn(batch, 3), torch.stack([torch.randint(0, 4, (batch,)), torch.randint(0, 5, (batch,))], 1)


LIBRARY: dict[str, LibraryModel] = {
    "transformers/llama": LibraryModel(_causal_lm("Llama"), _tokens),
    "transformers/qwen2": LibraryModel(_causal_lm("Qwen2"), _tokens),
    "transformers/qwen3": LibraryModel(_causal_lm("Qwen3", head_dim=8), _tokens),
    "transformers/mistral": LibraryModel(_causal_lm("Mistral"), _tokens),
    "transformers/gemma": LibraryModel(_causal_lm("Gemma", head_dim=8), _tokens),
    "transformers/phi": LibraryModel(_causal_lm("Phi"), _tokens),
    "transformers/mixtral": LibraryModel(_causal_lm("Mixtral", num_local_experts=4, num_experts_per_tok=2), _tokens),
    "transformers/opt": LibraryModel(_opt, _tokens),
    "transformers/gpt2": LibraryModel(_gpt2, _tokens),
    "transformers/t5": LibraryModel(_t5, _seq2seq),
    "transformers/bart": LibraryModel(_bart, _seq2seq),
    "transformers/whisper": LibraryModel(_whisper, _whisper_inputs),
    "transformers/wav2vec2": _wav2vec2_entry(),
    # SpecAugment (NumPy masks drawn in Wav2Vec2Model's own forward) off; LayerDrop stays on.
    "transformers/wav2vec2-no-specaugment": _wav2vec2_entry(mask_time_prob=0.0),
    "transformers/bert": LibraryModel(_encoder_classifier("Bert", **_BERT_SIZES), _masked),
    "transformers/roberta": LibraryModel(
        _encoder_classifier("Roberta", **{**_BERT_SIZES, "max_position_embeddings": 70}, pad_token_id=1), _masked),
    "transformers/distilbert": LibraryModel(
        _encoder_classifier("DistilBert", dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64),
        _masked),
    "transformers/clip": LibraryModel(_clip, _clip_inputs, (8, 13)),
    "transformers/convnext": LibraryModel(_vision(
        "ConvNext", "ConvNextForImageClassification", num_channels=3, hidden_sizes=[8, 16], depths=[2, 2],
        num_labels=3, num_stages=2, out_features=None), _images(), (32, 48)),
    "transformers/convnext_v2": LibraryModel(_vision(
        "ConvNextV2", "ConvNextV2ForImageClassification", num_channels=3, hidden_sizes=[8, 16], depths=[2, 2],
        num_labels=3, num_stages=2), _images(), (32, 48)),
    "transformers/swin": LibraryModel(_vision(
        "Swin", "SwinForImageClassification", image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
        num_heads=[2, 2], window_size=4, num_labels=3), _images(), (32, 64)),
    "transformers/dinov2": LibraryModel(_vision(
        "Dinov2", "Dinov2Model", image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64), _images(), (56, 84)),
    "transformers/segformer": LibraryModel(_vision(
        "Segformer", "SegformerForSemanticSegmentation", num_channels=3, num_encoder_blocks=4, depths=[1, 1, 1, 1],
        sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2],
        mlp_ratios=[2, 2, 2, 2], decoder_hidden_size=32, num_labels=3), _images(), (64, 96)),
    "transformers/sam_vision": LibraryModel(_vision(
        "SamVision", "SamVisionModel", hidden_size=32, output_channels=16, num_hidden_layers=4,
        num_attention_heads=2, image_size=64, patch_size=8, mlp_dim=64, window_size=4, global_attn_indexes=[1, 3]),
        _images(), (64, None)),  # absolute position embeddings of the configured image size
    "transformers/mamba": LibraryModel(_mamba, _tokens),
    "transformers/rwkv": LibraryModel(_rwkv, _tokens),
    "diffusers/unet2d": LibraryModel(_unet2d, lambda b, s: (torch.randn(b, 3, s, s), _timesteps(b)), (16, 32)),
    "diffusers/unet2d_condition": LibraryModel(
        _unet2d_condition, lambda b, s: (torch.randn(b, 4, s, s), _timesteps(b), torch.randn(b, 5, 16)), (16, 32)),
    "diffusers/dit": LibraryModel(_dit, lambda b, s: {
        "hidden_states": torch.randn(b, 4, s, s), "timestep": _timesteps(b), "class_labels": torch.randint(0, 10, (b,))},
        (8, None)),  # its position embeddings are built for the configured sample size
    "ultralytics/yolo11n": LibraryModel(_yolo("yolo11n.yaml"), _images(), (64, 96)),
    "ultralytics/yolo11n-seg": LibraryModel(_yolo("yolo11n-seg.yaml", "segment"), _images(), (64, 96)),
    "ultralytics/yolo11n-pose": LibraryModel(_yolo("yolo11n-pose.yaml", "pose"), _images(), (64, 96)),
    "ultralytics/yolo26n": LibraryModel(_yolo("yolo26n.yaml"), _images(), (64, 96)),
    "ultralytics/rtdetr-l": LibraryModel(_yolo("rtdetr-l.yaml", "rtdetr"), _images(), (64, 96)),
    "x-transformers/decoder": LibraryModel(_transformer_wrapper, lambda b, n: _ids(b, n)),
    "rtdl/ft-transformer": LibraryModel(_ft_transformer, _tabular, (0, None)),  # tabular: only the batch varies
}

LIBRARY_MODELS: dict[str, Callable[[], Built]] = {name: entry.example for name, entry in LIBRARY.items()}


def second_inputs(name: str) -> Any:
    """A batch of 3 for ``name`` at its second length or resolution (its only size where the model fixes it)."""
    return LIBRARY[name].second()
