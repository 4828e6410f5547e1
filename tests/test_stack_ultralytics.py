"""YOLO11n and YOLO26n trained with SIM by Ultralytics' own loop: ``YOLO(...).train(trainer=SimDetectionTrainer)``.

Each test writes a tiny YOLO-format dataset (generated images with boxes, a data
yaml) to a temporary folder and trains one epoch at 64x64 on the CPU, offline: any
network connection attempted fails the test. The README's "Training with
Ultralytics" block runs as written; the CPU settings (``plots=False``, ``amp=False``,
``device="cpu"``, ``workers=0``, a temporary project folder) are Ultralytics'
defaults for the duration of the test.
"""

from __future__ import annotations

import csv
import socket
import zipfile

import numpy as np
import pytest
import torch

import simfx

ultralytics = pytest.importorskip("ultralytics")
Image = pytest.importorskip("PIL.Image")

from readme_blocks import run_readme_block  # noqa: E402

IMGSZ = 64


def write_dataset(root, n: int = 4):
    """A YOLO-format dataset: red (class 0) and blue (class 1) boxes on grey, train and val splits."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            image, lines = np.full((IMGSZ, IMGSZ, 3), 40, np.uint8), []
            for _ in range(2):
                cls = int(rng.integers(0, 2))
                w, h = rng.integers(12, 28, 2)
                x, y = rng.integers(0, IMGSZ - 28, 2)
                image[y:y + h, x:x + w] = (220, 60, 60) if cls == 0 else (60, 60, 220)
                lines.append(f"{cls} {(x + w / 2) / IMGSZ:.6f} {(y + h / 2) / IMGSZ:.6f} {w / IMGSZ:.6f} {h / IMGSZ:.6f}")
            Image.fromarray(image).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: blue\n")
    return data


@pytest.fixture
def offline_cpu(monkeypatch, tmp_path):
    """No network (attempts are recorded and refused), and Ultralytics' defaults set for a CPU test run."""
    from ultralytics.utils import DEFAULT_CFG, checks, events

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access is refused in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for module in (ultralytics.utils, checks, events):
        monkeypatch.setattr(module, "ONLINE", False)  # skip the PyPI update check and analytics
    settings = dict(plots=False, amp=False, device="cpu", workers=0, batch=4, project=str(tmp_path / "runs"),
                    exist_ok=True, seed=0, deterministic=True)
    for name, value in settings.items():
        monkeypatch.setattr(DEFAULT_CFG, name, value)
    yield
    assert attempts == [], f"Ultralytics tried to reach the network: {attempts}"


def results_row(trainer) -> dict[str, float]:
    with open(trainer.csv) as f:
        (row,) = list(csv.DictReader(f))  # one epoch
    return {k.strip(): float(v) for k, v in row.items()}


def check_sim_training(trainer, config: str) -> None:
    """What a SIM run through Ultralytics' trainer must leave behind."""
    from ultralytics.nn.tasks import DetectionModel

    # The SIM loss is one of Ultralytics' loss columns, printed and saved (train only).
    assert trainer.loss_names[-1] == "sim_loss" and "sim_loss" in trainer.progress_string()
    row = results_row(trainer)
    assert np.isfinite(row["train/sim_loss"]) and row["train/sim_loss"] > 0
    assert "val/sim_loss" not in row and "val/box_loss" in row

    # Every reconstructor parameter is in the optimizer and was stepped with a gradient.
    model = trainer.model
    reconstructors = [p for n, p in model.named_parameters() if n.startswith("simfx.")]
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert reconstructors and all(id(p) in optimized for p in reconstructors)
    assert all(trainer.optimizer.state[p] for p in reconstructors)

    # The loss minimised: Ultralytics' own components, unchanged, and batch size x sim_loss.
    batch = trainer.preprocess_batch(next(iter(trainer.train_loader)))
    model.train()
    sim = model.__dict__["_simfx_sim"].sim
    torch.manual_seed(1)
    loss, items = model.loss(batch)
    torch.manual_seed(1)
    _, sim_loss = sim(batch["img"])
    plain_loss, plain_items = type(model).loss(model, batch)  # the model's own loss, no SIM
    size = batch["img"].shape[0]
    torch.testing.assert_close(loss[:-1], plain_loss.reshape(-1), rtol=0, atol=0)
    torch.testing.assert_close(loss[-1], sim_loss * size, rtol=0, atol=0)
    assert set(items) == {*plain_items, "sim_loss"} and items["sim_loss"] == sim_loss

    # last.pt / best.pt: the plain model (no simfx inside), the EMA weights Ultralytics trained.
    for path in (trainer.last, trainer.best):
        with zipfile.ZipFile(path) as archive:
            pickled = next(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
        assert b"simfx" not in pickled, f"{path.name} refers to simfx"
    saved = ultralytics.YOLO(trainer.last).model
    assert type(saved) is DetectionModel and not hasattr(saved, "simfx")
    plain = DetectionModel(config, nc=2, verbose=False)
    plain.load_state_dict(saved.float().state_dict(), strict=True)
    trained = simfx.original_state_dict(trainer.ema.ema.state_dict())
    for name, value in saved.state_dict().items():
        expected = trained[name].half() if trained[name].is_floating_point() else trained[name]  # saved in fp16
        torch.testing.assert_close(value, expected.to(value.dtype), rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_readme_block_trains_yolo11n_with_sim(tmp_path, offline_cpu):
    data = write_dataset(tmp_path / "data")
    images = sorted(str(p) for p in (tmp_path / "data" / "images" / "val").iterdir())
    ns = run_readme_block("ultralytics", data_yaml=str(data), epochs=1, imgsz=IMGSZ, images=images)
    check_sim_training(ns["model"].trainer, "yolo11n.yaml")
    assert len(ns["results"]) == len(images)  # best.pt predicts, without simfx


@pytest.mark.slow
def test_yolo26n_end_to_end_head_trains_with_sim_options(tmp_path, offline_cpu):
    from simfx.integrations.ultralytics import SimDetectionTrainer

    class Trainer(SimDetectionTrainer):
        sim_options = {"beta": 1e-2}

    data = write_dataset(tmp_path / "data")
    model = ultralytics.YOLO("yolo26n.yaml")
    model.train(data=str(data), epochs=1, imgsz=IMGSZ, trainer=Trainer)
    trainer = model.trainer
    assert type(trainer.model.criterion).__name__ == "E2ELoss"  # YOLO26: the NMS-free head's loss
    sim = trainer.model.__dict__["_simfx_sim"].sim
    assert sim.simfx_info.frontend == "export" and {b.options.beta for b in sim.sim_blocks} == {1e-2}
    check_sim_training(trainer, "yolo26n.yaml")
    results = ultralytics.YOLO(trainer.best).predict(str(data.parent / "images" / "val" / "0.png"), imgsz=IMGSZ)
    assert len(results) == 1


@pytest.mark.slow
def test_multi_scale_training_trains_with_sim_at_every_image_size(tmp_path, offline_cpu):
    from simfx.integrations.ultralytics import SimDetectionTrainer

    data = write_dataset(tmp_path / "data", n=8)
    sizes = set()

    def record_sizes(trainer):
        def hook(module, args):
            if module.training and isinstance(args[0], torch.Tensor):
                sizes.add(tuple(args[0].shape[-2:]))
        trainer.model.register_forward_pre_hook(hook)

    model = ultralytics.YOLO("yolo11n.yaml")
    model.add_callback("on_pretrain_routine_end", record_sizes)
    model.train(data=str(data), epochs=2, imgsz=IMGSZ, multi_scale=0.5, batch=2, trainer=SimDetectionTrainer)
    assert len(sizes) > 1  # images resized every batch, as multi-scale training does
    row = [r for r in csv.DictReader(open(model.trainer.csv))][-1]
    assert np.isfinite(float(row["train/sim_loss"])) and float(row["train/sim_loss"]) > 0
