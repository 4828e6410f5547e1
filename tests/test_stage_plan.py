"""The plan stage alone: hand-built Boundary records in, a settled Plan out (no model, no trace).

Every decision the rewrite follows is made here: which blocks, their options, channel
axes and widths, reconstructor keys; and every option that does not fit a block is
refused here, naming the block.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from simfx import NoEligibleBlockError, SelectorError, SimOptions
from simfx.analysis.boundaries import Boundary, Port
from simfx.analysis.shapes import TensorMeta
from simfx.plan.select import select_blocks
from simfx.runtime.objectives import OBJECTIVES, ObjectiveRegistry


class Stage(nn.Module):
    pass


class Block(nn.Module):
    pass


def meta(*shape, dtype=torch.float32):
    return TensorMeta(tuple(shape), dtype, "cpu")


def boundary(name, nodes, *, kind="module", module_type=Block, shape_in=(2, 8, 4, 4), shape_out=None,
             channel_dims=(1, 1), **facts) -> Boundary:
    """A candidate as the boundaries stage would report it; ``nodes`` is a string of node names."""
    nodes = tuple(nodes.split())
    facts.setdefault("weight_layers", 2)
    facts.setdefault("has_weight", facts["weight_layers"] > 0)
    x, y = meta(*shape_in), meta(*(shape_out or shape_in))
    return Boundary(
        name=name, kind=kind, module_type=None if kind == "residual" else module_type, nodes=nodes,
        entry=f"{nodes[0]}_in", exit=nodes[-1], in_meta=x, out_meta=y,
        in_channel_dim=channel_dims[0], out_channel_dim=channel_dims[1],
        module_name=None if kind == "residual" else name,
        inputs=(Port(f"{nodes[0]}_in", x, channel_dims[0]),), outputs=(Port(nodes[-1], y, channel_dims[1]),),
        **facts,
    )


# A ResNet-like stage: two residual blocks inside a container, a head producing the output.
RESNET_LIKE = [
    boundary("stem", "conv bn relu", weight_layers=1),
    boundary("layer1", "a1 a2 a3 b1 b2 b3", module_type=Stage, weight_layers=4),
    boundary("layer1.0", "a1 a2 a3", residual=True, container_child=True),
    boundary("layer1.1", "b1 b2 b3", residual=True, container_child=True),
    boundary("head", "fc", module_type=nn.Linear, shape_in=(2, 8), weight_layers=1, produces_output=True),
]


def test_auto_picks_the_residual_blocks_and_says_why_for_every_other_candidate():
    plan = select_blocks(RESNET_LIKE)
    assert plan.names == ["layer1.0", "layer1.1"]
    assert [b.key for b in plan.blocks] == ["layer1_0", "layer1_1"]
    assert plan.decisions["layer1.0"] == "selected by auto"
    assert plan.decisions["head"] == "produces the model's output"
    assert plan.decisions["stem"] == "not a residual block"
    assert plan.decisions["layer1"] == "not a residual block"


def test_auto_falls_back_to_container_children_when_nothing_is_residual():
    plain = [
        boundary("features", "c1 c2 c3", module_type=nn.Sequential, weight_layers=3),
        boundary("features.0", "c1", module_type=nn.Conv2d, weight_layers=1, container_child=True),
        boundary("features.1", "c2", module_type=nn.Conv2d, weight_layers=1, container_child=True),
        boundary("features.2", "c3", module_type=nn.Conv2d, weight_layers=1, container_child=True,
                 produces_output=True),
    ]
    plan = select_blocks(plain)
    assert plan.names == ["features.0", "features.1"]
    assert plan.decisions["features"] == "not a weighted child of an nn.Sequential/nn.ModuleList"
    assert plan.decisions["features.2"] == "produces the model's output"
    # A child that is itself a container of two weighted children is descended into.
    nested = [boundary("features.0", "c1 c2", module_type=nn.Sequential, container_child=True),
              boundary("features.0.0", "c1", weight_layers=1, container_child=True),
              boundary("features.0.1", "c2", weight_layers=1, container_child=True),
              boundary("features.1", "c3", weight_layers=1, container_child=True, produces_output=True)]
    plan = select_blocks(nested)
    assert plan.names == ["features.0.0", "features.0.1"]
    assert plan.decisions["features.0"] == "a container of 2 blocks (auto picks its children)"


def test_no_eligible_block_lists_each_candidate_and_its_reason():
    rejected = [boundary("emb", "e", eligible=False, reason="its input is an integer tensor"),
                boundary("head", "fc", produces_output=True)]
    why = r"(?s)emb \(Block\): its input is an integer tensor.*head \(Block\): produces the model's output"
    with pytest.raises(NoEligibleBlockError, match=why):
        select_blocks(rejected)
    assert select_blocks(rejected, allow_empty=True).blocks == ()


def test_selectors_by_class_glob_regex_and_predicate_and_exclude():
    by_class = select_blocks(RESNET_LIKE, [Stage])
    assert by_class.names == ["layer1"] and by_class.decisions["layer1"] == "selected by Stage"
    assert select_blocks(RESNET_LIKE, "layer1.*").names == ["layer1.0", "layer1.1"]
    assert select_blocks(RESNET_LIKE, re.compile(r"layer1\.1")).names == ["layer1.1"]
    assert select_blocks(RESNET_LIKE, lambda b: b.weight_layers == 1 and not b.produces_output).names == ["stem"]
    plan = select_blocks(RESNET_LIKE, exclude="layer1.1")
    assert plan.names == ["layer1.0"] and plan.decisions["layer1.1"] == "excluded by 'layer1.1'"


def test_a_selector_matching_nothing_names_what_exists():
    with pytest.raises(SelectorError, match=r"(?s)'layer9\.\*' matched no block.*layer1\.0"):
        select_blocks(RESNET_LIKE, "layer9.*")
    with pytest.raises(SelectorError, match=r"overrides selector 'stem' matched none of the selected blocks"):
        select_blocks(RESNET_LIKE, overrides={"stem": {"beta": 1.0}})


def test_overrides_settle_per_block_options_over_the_defaults():
    plan = select_blocks(RESNET_LIKE, defaults=SimOptions(beta=0.5),
                         overrides={"layer1.1": {"token_ratio": 0.5, "objective": "self_model"}})
    first, second = plan.blocks
    assert (first.options.beta, first.options.token_ratio, first.options.objective) == (0.5, 0.2, "rho_sim")
    assert (second.options.beta, second.options.token_ratio, second.options.objective) == (0.5, 0.5, "self_model")


def test_channel_axes_and_widths_are_settled_in_the_plan():
    nhwc = boundary("blk", "n1 n2", shape_in=(2, 4, 4, 8), shape_out=(2, 2, 2, 16), channel_dims=(3, 3),
                    residual=True)
    block, = select_blocks([nhwc]).blocks
    assert (block.in_channel_dim, block.out_channel_dim, block.in_width, block.out_width) == (3, 3, 8, 16)
    # channel_dim overrides the inferred axis, negative axes count from the end.
    block, = select_blocks([nhwc], defaults=SimOptions(channel_dim=(-1, 1))).blocks
    assert (block.in_channel_dim, block.out_channel_dim, block.in_width, block.out_width) == (3, 1, 8, 2)


def test_options_that_do_not_fit_a_block_are_refused_naming_it():
    with pytest.raises(ValueError, match=r"channel_dim=0 for the input of block 'layer1\.0'.*non-batch axis in 1\.\.3"):
        select_blocks(RESNET_LIKE, defaults=SimOptions(channel_dim=0))
    with pytest.raises(ValueError, match=r"block 'layer1\.0': token_sampling='topk_mean'.*activation_l2"):
        select_blocks(RESNET_LIKE, defaults=SimOptions(objective="activation_l2", token_sampling="topk_mean"))
    with pytest.raises(SelectorError, match=r"block 'layer1\.0': primary_input=3, but it has 1 tensor input"):
        select_blocks(RESNET_LIKE, overrides={"layer1.0": {"primary_input": 3}})


def test_too_few_tokens_drops_an_auto_block_and_warns_for_a_named_one():
    tiny = boundary("late", "t1 t2", shape_in=(2, 8, 1, 1), residual=True)
    assert select_blocks([tiny], allow_empty=True).decisions["late"] == (
        "1 output token(s) at the example input; rho_sim needs 2")
    with pytest.warns(UserWarning, match=r"block 'late' has 1 output token.*skipped \(NaN\)"):
        assert select_blocks([tiny], "late").names == ["late"]


def test_objectives_are_looked_up_in_the_registry_given():
    registry = ObjectiveRegistry()
    with pytest.raises(ValueError, match=r"unknown objective 'rho_sim'"):
        select_blocks(RESNET_LIKE, objectives=registry)
    assert select_blocks(RESNET_LIKE, objectives=OBJECTIVES).names == ["layer1.0", "layer1.1"]


def test_reconstructor_keys_are_unique_module_names():
    twice = [boundary("blk", "a1 a2", residual=True), boundary("blk@1", "b1 b2", residual=True),
             boundary("blk_1", "c1 c2", residual=True)]
    keys = [b.key for b in select_blocks(twice).blocks]
    assert len(set(keys)) == 3 and all(re.fullmatch(r"\w+", k) for k in keys)
