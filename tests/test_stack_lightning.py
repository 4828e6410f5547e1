"""A LightningModule holding a transformed torchvision model, fitted by ``lightning.Trainer``, eager and compiled.

The README's "Training with Lightning" blocks run as written (torchvision's ResNet
with one block per stage, at 32x32, three steps on the CPU); the per-block SIM losses it logs through ``self.log`` are read
back from the Trainer's CSV logger, and its checkpoint loads into the plain ResNet.
The compiled run swaps the ``aot_eager`` backend into ``torch.compile`` to stay fast on
CPU (inductor would compile C++ for minutes); it counts the graphs compiled.
"""

from __future__ import annotations

import csv
import functools
import math

import pytest
import torch
import torch.nn.functional as F

import simfx

L = pytest.importorskip("lightning")
torchvision = pytest.importorskip("torchvision")

from readme_blocks import run_readme_block  # noqa: E402


def resnet10() -> torch.nn.Module:
    """torchvision's ResNet with one BasicBlock per stage: a small graph, so compiling stays quick."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


def names(tmp_path, logger):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 10, (24,), generator=g))
    return dict(
        simfx=simfx, torch=torch, F=F, model=resnet10(),
        example=torch.randn(2, 3, 32, 32), loader=torch.utils.data.DataLoader(data, batch_size=8), max_steps=3,
        log_every=1,
        logger=logger, checkpoint_path=str(tmp_path / "sim.ckpt"), plain_model=resnet10(),
    )


def logged_rows(logger) -> list[dict[str, str]]:
    logger.save()
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return list(csv.DictReader(f))


def test_readme_block_fits_and_logs_per_block_losses(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="csv")
    module = run_readme_block("lightning-module", **names(tmp_path, logger))
    ns = run_readme_block("lightning-fit", **module)
    lit, trainer = ns["lit"], ns["trainer"]
    assert trainer.global_step == 3
    blocks = [b.name for b in lit.sim.sim_blocks]
    rows = [r for r in logged_rows(logger) if r.get("sim_loss")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    for row in rows:
        per_block = [float(row[f"sim_loss/{name}"]) for name in blocks]
        assert all(math.isfinite(v) and v > 0 for v in per_block)
        assert float(row["sim_loss"]) == pytest.approx(5e-3 * sum(per_block) / len(per_block), rel=1e-5)
        assert float(row["train_loss"]) > float(row["sim_loss"])

    # The checkpoint Lightning saved loads into the plain architecture, strict, same outputs.
    plain, x = ns["plain_model"].eval(), torch.randn(2, 3, 32, 32)
    lit.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), simfx.strip(lit.sim)(x), rtol=0, atol=0)


@pytest.mark.slow
def test_compiled_module_fits_in_one_graph(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    # nn.Module.compile calls torch.compile: give it the counting aot_eager backend.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_aot_eager))
    torch._dynamo.reset()
    logger = CSVLogger(tmp_path, name="csv")
    given = names(tmp_path, logger)
    LitClassifier = run_readme_block("lightning-module", **given)["LitClassifier"]
    lit = LitClassifier(given["model"], given["example"], compile=True)
    before = {k: v.clone() for k, v in lit.state_dict().items()}
    trainer = L.Trainer(max_steps=3, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(lit, given["loader"])
    assert trainer.global_step == 3
    assert len(graphs) == 1  # the training graph, compiled once, no recompile over three steps
    assert list(lit.state_dict()) == list(before)  # compiled in place: the same keys
    assert any(not torch.equal(before[k], v) for k, v in lit.state_dict().items() if k.startswith("sim.simfx."))
    rows = [r for r in logged_rows(logger) if r.get("sim_loss")]
    assert len(rows) == 3 and all(float(r["sim_loss"]) > 0 for r in rows)
