"""A transformed Hugging Face model trained by ``transformers.Trainer`` itself: no subclass, SIM in the logs.

The README's "Training with transformers" block runs as written, on a tiny random-init
BERT and an in-memory dataset (input ids built directly: no tokenizer, no download).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import simfx

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from conftest import assert_reconstructor_gradients  # noqa: E402
from readme_blocks import run_readme_block  # noqa: E402
from simfx.integrations.transformers import SimLossCallback  # noqa: E402

VOCAB, LENGTH, LABELS = 128, 12, 3


def tiny_bert() -> torch.nn.Module:
    # No dropout: the same batch gives the same logits in training, so losses compare exactly.
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=LABELS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def dataset(n: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {"input_ids": torch.randint(0, VOCAB, (LENGTH,), generator=g),
         "attention_mask": torch.ones(LENGTH, dtype=torch.long),
         "labels": torch.tensor(i % LABELS)}
        for i in range(n)
    ]


def arguments(output_dir, **changes) -> "transformers.TrainingArguments":
    options = dict(max_steps=3, per_device_train_batch_size=4, logging_steps=1, use_cpu=True, disable_tqdm=True,
                   save_strategy="no", seed=0)
    return transformers.TrainingArguments(str(output_dir), **{**options, **changes})


def outputs_equal(a: torch.nn.Module, b: torch.nn.Module, batch: dict) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(**batch).logits, b(**batch).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_readme_block_trains_in_trainer_with_sim_loss_in_the_logs(tmp_path):
    model, train = tiny_bert(), dataset()
    before = copy.deepcopy(model.state_dict())
    ns = run_readme_block("transformers", simfx=simfx, model=model, train_dataset=train,
                          output_dir=str(tmp_path), max_steps=3, log_every=1)
    sim, trainer = ns["sim"], ns["trainer"]
    blocks = [b.name for b in sim.sim_blocks]
    assert blocks, "BERT got no SIM block"

    # Every training log has the SIM loss and each block's; the summary and the history agree.
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    for entry in logs:
        assert math.isfinite(entry["sim_loss"]) and entry["sim_loss"] > 0
        assert entry["loss"] > entry["sim_loss"]  # task loss + sim_loss
        per_block = [entry[f"sim_loss/{name}"] for name in blocks]
        # sim_loss = beta * mean(block losses), beta = 5e-3 (the default)
        assert entry["sim_loss"] == pytest.approx(5e-3 * sum(per_block) / len(per_block), rel=1e-5)

    # It trained the model, and the optimizer holds every reconstructor parameter.
    after = simfx.strip(sim).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    reconstructors = [(n, p) for n, p in sim.named_parameters() if n.startswith("simfx.")]
    assert reconstructors and all(id(p) in optimized for _, p in reconstructors)

    # In training the output is the model's own type, its loss the task loss plus sim_loss.
    batch = transformers.default_data_collator(train[:4])
    sim.train()
    out = sim(**batch)
    reference = simfx.strip(sim)(**batch)  # the model itself, same batch, training mode
    assert type(out) is type(reference)
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, reference.loss + out.sim_loss, rtol=0, atol=0)
    assert set(out.sim_losses) == set(blocks)
    sim.zero_grad()
    out.loss.backward()  # what the Trainer minimises reaches every reconstructor
    assert_reconstructor_gradients(reconstructors)

    # Evaluation runs the model itself: eval_loss is the task loss alone.
    sim.eval()
    with torch.no_grad():
        task_loss = simfx.strip(sim)(**batch).loss
    assert trainer.evaluate(eval_dataset=train[:4])["eval_loss"] == pytest.approx(task_loss.item(), rel=1e-6)

    # save_pretrained of the stripped model loads back into the plain architecture.
    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "model")
    outputs_equal(plain, simfx.strip(sim), batch)


def test_trainer_checkpoint_resumes_and_loads_into_the_plain_architecture(tmp_path):
    from safetensors.torch import load_file

    model, train = tiny_bert(), dataset()
    sim = simfx.transform(model, transformers.default_data_collator(train[:2]), loss_in_output=True)
    trainer = transformers.Trainer(model=sim, args=arguments(tmp_path, save_strategy="steps", save_steps=3),
                                   train_dataset=train, callbacks=[SimLossCallback()])
    trainer.train()
    saved = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    assert any(k.startswith("simfx.") for k in saved)  # the Trainer saved sim.state_dict()

    plain = tiny_bert()
    plain.load_state_dict(simfx.original_state_dict(saved), strict=True)
    outputs_equal(plain, simfx.strip(sim), transformers.default_data_collator(train[:4]))

    # Resuming loads the whole checkpoint, reconstructors included (max_steps reached: no step after it).
    with torch.no_grad():
        for p in sim.parameters():
            p.zero_()
    trainer = transformers.Trainer(model=sim, args=arguments(tmp_path), train_dataset=train)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    state = sim.state_dict()
    assert set(state) == set(saved)
    for name, value in saved.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


def test_with_beta_zero_trainer_trains_the_transformed_model_exactly_as_the_model(tmp_path):
    """SIM is the only change: with beta=0 the Trainer leaves the same weights as on the plain model."""
    model, train = tiny_bert(), dataset()
    plain = copy.deepcopy(model)
    sim = simfx.transform(model, transformers.default_data_collator(train[:2]), loss_in_output=True, beta=0.0)
    transformers.Trainer(model=plain, args=arguments(tmp_path / "plain"), train_dataset=train).train()
    transformers.Trainer(model=sim, args=arguments(tmp_path / "sim"), train_dataset=train).train()
    trained = simfx.strip(sim).state_dict()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=0, msg=name)


def test_without_labels_the_output_has_sim_loss_and_no_loss():
    model, train = tiny_bert(), dataset()
    inputs = {k: v for k, v in transformers.default_data_collator(train[:2]).items() if k != "labels"}
    sim = simfx.transform(model, inputs, loss_in_output=True)
    out = sim(**inputs)
    assert "loss" not in out and out.loss is None and out.sim_loss > 0
    sim.eval()
    assert "sim_loss" not in sim(**inputs)  # eval: the model's own output alone


@pytest.mark.slow
def test_with_num_items_in_the_example_gradient_accumulation_trains_exactly_as_the_model(tmp_path):
    """The Trainer passes num_items_in_batch to the model and to the transformed module alike."""
    model, train = tiny_bert(), dataset()
    plain = copy.deepcopy(model)
    example = {**transformers.default_data_collator(train[:2]), "num_items_in_batch": torch.tensor(2)}
    sim = simfx.transform(model, example, loss_in_output=True, beta=0.0)
    assert sim.accepts_loss_kwargs
    accumulate = dict(gradient_accumulation_steps=2)
    expected = transformers.Trainer(model=plain, args=arguments(tmp_path / "plain", **accumulate), train_dataset=train)
    expected.train()
    trainer = transformers.Trainer(model=sim, args=arguments(tmp_path / "sim", **accumulate), train_dataset=train,
                                   callbacks=[SimLossCallback()])
    trainer.train()
    trained = simfx.strip(sim).state_dict()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=0, msg=name)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses == [h["loss"] for h in expected.state.log_history if "loss" in h]


def test_a_model_that_trains_itself_takes_num_items_in_batch_as_the_model_does(tmp_path):
    """Gradient accumulation: the Trainer passes num_items_in_batch to the model, through the transformed module."""
    model, train = tiny_bert(), dataset()
    plain = copy.deepcopy(model)
    sim = simfx.transform(model, transformers.default_data_collator(train[:2]), loss_in_output=True, beta=0.0)
    assert sim.simfx_info.runtime == "model" and sim.accepts_loss_kwargs
    accumulate = dict(gradient_accumulation_steps=2)
    transformers.Trainer(model=plain, args=arguments(tmp_path / "plain", **accumulate), train_dataset=train).train()
    transformers.Trainer(model=sim, args=arguments(tmp_path / "sim", **accumulate), train_dataset=train,
                         callbacks=[SimLossCallback()]).train()
    trained = simfx.strip(sim).state_dict()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=0, atol=0, msg=name)


# --- dynamic padding and gradient checkpointing, as people fine-tune -------------------------------------------


WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def word_tokenizer():
    """A word-level tokenizer built in memory (no download), with the special tokens collators need."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]")


def texts(n: int = 24) -> list[dict]:
    """Sentences of 5 to 30 words: each batch is padded to its own longest one."""
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(5, 31, (n,), generator=g)
    return [{"text": " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (int(k),), generator=g)),
             "label": i % LABELS} for i, k in enumerate(lengths)]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classifier", "causal_lm"])
def test_trainer_with_dynamic_padding_and_gradient_checkpointing_trains_with_sim_in_the_logs(tmp_path, task):
    tokenizer = word_tokenizer()
    rows = [dict(tokenizer(row["text"]), **({"labels": row["label"]} if task == "classifier" else {}))
            for row in texts()]
    if task == "classifier":
        model = tiny_bert()
        collator = transformers.DataCollatorWithPadding(tokenizer)
    else:
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                          pad_token_id=0)
        model = transformers.LlamaForCausalLM(config)
        collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)  # pads, and labels the rest
    example = collator(rows[:2])
    sim = simfx.transform(model, dict(example), loss_in_output=True)
    seen = set()
    sim.register_forward_pre_hook(lambda module, args, kwargs: seen.add(tuple(kwargs["input_ids"].shape)),
                                  with_kwargs=True)
    args = arguments(tmp_path, max_steps=4, gradient_checkpointing=True, remove_unused_columns=True)
    trainer = transformers.Trainer(model=sim, args=args, train_dataset=rows, data_collator=collator,
                                   callbacks=[SimLossCallback()])
    trainer.train()
    assert model.is_gradient_checkpointing  # the Trainer switched it on through the transformed module
    assert len({length for _, length in seen}) > 1  # batches of several lengths, each padded to its own longest
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4 and all(entry["sim_loss"] > 0 for entry in logs)
