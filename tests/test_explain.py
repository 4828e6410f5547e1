"""simfx.explain: the report's rows, totals, rejections and renderings match the transform."""

from __future__ import annotations

import json

import pytest
import torch

import simfx
from conftest import ConvBlock, InlineResidualNet, TinyResNet

IMAGE = (2, 3, 16, 16)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyResNet()
    sim = simfx.transform(model, torch.randn(*IMAGE), overrides={"blocks.2": {"token_ratio": 0.5}})
    return model, sim, simfx.explain(sim, name="TinyResNet")


def test_rows_match_the_plan(tiny):
    _, sim, report = tiny
    plan = sim.simfx_info.plan
    assert [r.name for r in report.blocks] == plan.names == ["blocks.0", "blocks.1", "blocks.2"]
    for row, block in zip(report.blocks, plan.blocks):
        head = sim.get_submodule(f"simfx.{block.key}")
        assert row.params == sum(p.numel() for p in head.parameters())
        assert row.in_shape == block.boundary.in_shape and row.out_shape == block.boundary.out_shape
        assert row.module_type == "ConvBlock" and row.residual
        assert row.objective == "rho_sim" and row.options["token_ratio"] == block.options.token_ratio
    assert [r["name"] for r in report.rows()] == plan.names


def test_totals(tiny):
    model, sim, report = tiny
    assert report.model_params == sum(p.numel() for p in model.parameters())
    assert report.added_params == sum(p.numel() for p in sim.get_submodule("simfx").parameters())
    assert report.param_share == pytest.approx(report.added_params / report.model_params)
    assert report.added_flops == sum(r.flops for r in report.blocks)
    assert report.model_flops > 0
    assert report.flop_share == pytest.approx(report.added_flops / report.model_flops)


def test_rho_sim_flops_are_counted_analytically(tiny):
    _, _, report = tiny
    row = report.blocks[1]  # blocks.1: 8 -> 16 channels, 16x16 -> 8x8, 64 tokens
    assert (row.tokens, row.sampled_tokens) == (64, 12)
    d, cin, cout = 128, 8, 16
    proj = cin * 2 * d + 2 * d * d + d * d
    trainable = cout * cin + proj + d * d  # pre_proj, projector, predictor: forward + backward
    target = proj  # no-grad branch: forward only
    assert row.flops == 12 * 2 * (3 * trainable + target)
    assert report.blocks[2].sampled_tokens == 32  # token_ratio=0.5 override


def test_model_flops_match_a_direct_count(tiny):
    model, _, report = tiny
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.randn(*IMAGE))
    model.train()
    assert report.model_flops == 3 * counter.get_total_flops() // IMAGE[0]


def test_rejected_candidates_carry_the_decision(tiny):
    _, sim, report = tiny
    info = sim.simfx_info
    expected = {b.name for b in info.candidates} - set(info.plan.names)
    assert {r.name for r in report.rejected} == expected
    for r in report.rejected:
        assert r.reason == (info.plan.decisions.get(r.name) or next(b.reason for b in info.candidates if b.name == r.name))
    assert "blocks" in expected  # the Sequential holding the blocks contains them


def test_text_and_markdown_renderings(tiny):
    _, _, report = tiny
    text = str(report)
    assert "3 boundaries with SIM in TinyResNet" in text
    assert "Rejected candidates" in text and "token_ratio=0.5" in text
    for name in ("blocks.0", "blocks.1", "blocks.2"):
        assert name in text
    md = report.to_markdown()
    lines = md.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| block"))
    assert set(lines[header + 1]) <= {"|", "-"}
    assert sum(line.startswith("| `blocks.") for line in lines) == 3
    data = json.loads(json.dumps(report.to_dict()))
    assert data["totals"]["boundaries"] == 3 and len(data["rejected"]) == len(report.rejected)


def test_opaque_modules_are_listed():
    sim = simfx.transform(TinyResNet(), torch.randn(*IMAGE), leaf_modules=[ConvBlock])
    report = simfx.explain(sim)
    assert report.opaque and "Opaque modules" in str(report) and "blocks.1" in str(report)
    assert "Opaque modules" not in str(simfx.explain(simfx.transform(TinyResNet(), torch.randn(*IMAGE))))


def test_inline_residuals_and_measured_objectives():
    sim = simfx.transform(InlineResidualNet(), torch.randn(2, 10, 8), objective="self_model")
    report = simfx.explain(sim)
    assert all(r.kind == "residual" and r.module_type == "residual" for r in report.blocks)
    row = report.blocks[0]
    width = row.out_shape[-1]
    # self_model has no analytic rule: measured forward + backward of W a + b on k tokens.
    assert row.flops == row.sampled_tokens * 3 * 2 * width * width
    assert report.model_flops > 0


def test_explain_rejects_a_plain_model():
    with pytest.raises(TypeError, match="find_boundaries"):
        simfx.explain(TinyResNet())
