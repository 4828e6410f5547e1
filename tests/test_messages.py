"""Every error simfx raises, raised on purpose and checked for its class and text.

``MESSAGES`` maps a label (what the user did) to a trigger, the exception class
and a pattern the message must match: it names the module, node, option or
value involved, what was expected, and (where there is a choice) what to do.
Rows say nothing about where the raise is, so moving code between functions or
files changes no row.

The meta-test at the bottom scans the package for ``raise SomeError(...)`` and
fails, naming the site, when no trigger raised from it: adding a raise means
adding a row. Which site a trigger reached is read from its traceback.
"""

from __future__ import annotations

import argparse
import ast
import pathlib
import random
import re
import sys
import traceback
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import simfx
from simfx import compat, model_spec
from simfx.capture import fx_trace as trace
from simfx.runtime import heads, objectives
from simfx.options import SimOptions

from conftest import ConvBlock, TinyResNet

PACKAGE = pathlib.Path(simfx.__file__).parent
X = torch.randn(2, 3, 8, 8)


# --- models used by the triggers ------------------------------------------------------


class DataDependent(nn.Module):
    """Python control flow on a tensor value in the model's own forward: neither fx nor export traces it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -x


class UntraceableChild(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class TwoUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = UntraceableChild(), UntraceableChild()

    def forward(self, x):
        return self.b(self.a(x))


class HasSimfx(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = TinyResNet()
        self.simfx = nn.Linear(1, 1)

    def forward(self, x):
        return self.body(x)


class RandomRoot(nn.Module):
    """A random decision with no tensor input in the model's own forward (a trace would freeze it)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(ConvBlock(3, 4), ConvBlock(4, 4))

    def forward(self, x):
        if self.training and random.random() < 0.5:
            x = x.flip(-1)
        return self.blocks(x)


class TensorCheck(nn.Module):
    """Branches on isinstance(value, torch.Tensor): a proxy is not one, so fx takes the other branch."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(ConvBlock(3, 4), ConvBlock(4, 4))

    def forward(self, x):
        y = self.blocks(x)
        return y * 2 if isinstance(y, torch.Tensor) else y


def _hooked(model, *, kind="forward"):
    if kind == "forward":
        model.blocks[0].register_forward_hook(lambda module, args, output: None)
    return model


class NoSubmoduleCall(nn.Module):
    """Branches on a tensor's value and applies its weight itself: no capture takes it, no module call shows a block."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.weight if x.sum() > 0 else -(x @ self.weight)


class TinyBatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.norm(self.fc(x))


class ReentrantCheckpoint(TinyResNet):
    """Checkpoints its blocks the old way once asked to: a reentrant checkpoint runs them with gradients off."""

    checkpointing = False

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=True) if self.checkpointing else block(x)
        return self.fc(x.mean(dim=(2, 3)))


def _reentrant_checkpointing_switched_on_after_transform():
    model = ReentrantCheckpoint()
    sim = simfx.transform(model, X, frontend="export")
    model.checkpointing = True
    sim(X)


class SkipsWhenNotExporting(TinyResNet):
    """Runs its last block only while torch.export traces it (the branch a deployment export takes)."""

    def forward(self, x):
        x = self.blocks[1](self.blocks[0](self.stem(x)))
        if torch.compiler.is_exporting():
            x = self.blocks[2](x)
        return self.fc(x.mean(dim=(2, 3)))


def _a_block_only_export_runs():
    if not hasattr(torch.compiler, "is_exporting"):
        pytest.skip("torch.compiler.is_exporting is new in torch 2.6")
    simfx.transform(SkipsWhenNotExporting(), X, frontend="export")


def _objective_with_an_unused_parameter():
    class Unused(nn.Module):
        def __init__(self, c_in, c_out, options):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x_tokens, y_tokens):
            return y_tokens.float().square().mean()

    with objectives.OBJECTIVES.registered("unused_parameter", Unused):
        simfx.transform(TinyResNet(), X, frontend="export", objective="unused_parameter")


def _fx_training_call_with_a_keyword_the_example_lacked():
    sim = simfx.transform(MaskedLinear(), torch.randn(2, 5, 4), frontend="fx")
    sim.train()
    sim(torch.randn(2, 5, 4), mask=torch.ones(2, 5))


class MaskedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x, mask=None):
        x = self.blocks(x)
        if mask is not None:
            x = x * mask.unsqueeze(-1)
        return self.head(x)


def _sim_of(model, **options):
    return simfx.transform(model, X, **options)


def _train_call(sim):
    sim.train()
    sim(X)


def _hook_after_transform():
    sim = _sim_of(TinyResNet())
    sim.blocks.register_forward_hook(lambda module, args, output: None)
    _train_call(sim)


def _traced_flag_changed():
    class ReadsItsFlag(nn.Module):
        def forward(self, x):
            return x * 2 if self.training else x

    model = nn.Sequential(ConvBlock(3, 4), ConvBlock(4, 4), ReadsItsFlag(), nn.Conv2d(4, 2, 1))
    sim = _sim_of(model)
    model[2].eval()
    sim(X)


def _root_backward_hook():
    model = TinyResNet()
    sim = _sim_of(model)
    model.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    _train_call(sim)


def _root_pre_hook_adds_an_argument():
    model = TinyResNet()
    sim = _sim_of(model)
    model.register_forward_pre_hook(lambda module, args: (args[0], 1.0))
    _train_call(sim)


def _root_pre_hook_returns_a_bad_value():
    model = TinyResNet()
    sim = _sim_of(model)
    model.register_forward_pre_hook(lambda module, args, kwargs: args[0], with_kwargs=True)
    _train_call(sim)


def _scripted() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice
        return torch.jit.script(nn.Linear(4, 4))


class IntContext(nn.Module):
    """A block taking an integer side input (class labels) besides its feature map."""

    def __init__(self):
        super().__init__()
        self.block = LabelledBlock()

    def forward(self, x):
        return self.block(x, x.flatten(1).argmax(1))


class LabelledBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.embed = nn.Embedding(192, 3)

    def forward(self, x, labels):
        return x + self.conv(x) + self.embed(labels)[:, :, None, None]


def _graph_that_cannot_train(monkeypatch):
    from simfx.emit import check

    real, calls = check._run, []

    def run(forward, parameters, model):
        calls.append(1)
        if len(calls) == 2:  # the training graph's run (the model's own went first)
            raise RuntimeError("derivative for aten::copy is not implemented")
        return real(forward, parameters, model)

    monkeypatch.setattr(check, "_run", run)
    simfx.transform(TinyResNet(), X, frontend="fx")


def _stand_in(name: str) -> nn.Module:
    """A module of a wrapper's class name (the real FSDP wrappers need a process group)."""
    return type(name, (TinyResNet,), {})()


class InplaceRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean((2, 3)))



class SparseGCN(nn.Module):
    """A graph layer multiplying by a sparse adjacency, as GCNs do: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, adjacency):
        return self.b(torch.sparse.mm(adjacency, self.a(x)))


def _clamp_rows(x):
    return x if x.sum() > 0 else -x


class PrivateHelper(nn.Module):
    """The model's own forward calls a private helper fx cannot trace (autowrap skips '_' names)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(_clamp_rows(self.a(x)))


class BranchingEncoder(nn.Module):
    """An encoder fx keeps opaque (it branches on a tensor value), holding two weight layers."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x) if x.sum() > 0 else layer(-x)
        return x


class OpaqueEncoderOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = BranchingEncoder()

    def forward(self, x):
        return self.enc(x)


class LayerDropConfig(nn.Module):
    """Hugging Face style: LayerDrop switched on in the config and drawn in the model's own forward."""

    def __init__(self):
        super().__init__()
        self.config = argparse.Namespace(layerdrop=0.1)
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x):
        for layer in self.layers:
            if self.training and torch.rand([]) < self.config.layerdrop:
                continue
            x = layer(x)
        return x


def _returns_a_cache():
    import transformers

    class ReturnsCache(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

        def forward(self, x):
            return self.blocks(x), transformers.DynamicCache()

    simfx.transform(ReturnsCache(), torch.randn(2, 3, 4), frontend="export")


# --- triggers ----------------------------------------------------------------------------


def _compat_class(*init_args, forward_returns=None, width_attr=8, decorate_init=True, **init_kwargs):
    """Define a decorated block class (errors in init_proj's settings raise here)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.width = width_attr
            self.fc = nn.Linear(8, 8)

        @compat.forward_with_sim_cache()
        def forward(self, x):
            out = self.fc(x)
            return (out, out) if forward_returns == "tuple" else out

    if decorate_init:
        Block.__init__ = compat.init_proj(*init_args, **init_kwargs)(Block.__init__)
    return Block


def _compat_forward(*init_args, x=None, **kwargs):
    block = _compat_class(*init_args, **kwargs)()
    block.train()
    block(torch.randn(2, 5, 8) if x is None else x)


def _sim():
    return simfx.transform(TinyResNet(), X)


def _trace_with_many_opaque():
    trace.trace_model(TwoUntraceable(), trace.ExampleInputs((torch.randn(2, 4),)), auto_opaque=True, max_opaque=1)


def _register_twice():
    objectives.register_objective("rho_sim", lambda cin, cout, o: nn.Identity())


def _objective_factory_returns_a_non_module():
    with objectives.OBJECTIVES.registered("simfx_test_not_a_module", lambda cin, cout, o: 3):
        heads.build_objective(SimOptions(objective="simfx_test_not_a_module"),
                              in_channel_dim=1, out_channel_dim=1, in_width=4, out_width=4)


def _topk_for_an_objective_without_input():
    heads.build_objective(SimOptions(objective="self_model", token_sampling="topk_mean"),
                          in_channel_dim=1, out_channel_dim=1, in_width=4, out_width=4)


def _without_module(name, call):
    def run(monkeypatch):
        monkeypatch.setitem(sys.modules, name, None)
        call()
    return run


def _with_module(name, call):
    """A trigger that needs an optional library: its row skips where that is not installed."""
    def run():
        pytest.importorskip(name)
        call()
    return run


def _dot_missing(monkeypatch):
    monkeypatch.setenv("PATH", "")
    simfx.draw(_sim(), "graph.svg", engine="dot")


def _dot_fails(tmp_path, monkeypatch):
    # A `dot` on PATH that fails the way a broken graphviz install does.
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'Error: broken graphviz' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    simfx.draw(_sim(), tmp_path / "g.svg", engine="dot")


def _factory_file(tmp_path, source, attr="make"):
    path = tmp_path / "user_model.py"
    path.write_text(source)
    model_spec.load_model(f"{path}:{attr}")


def _cli_positive():
    from simfx import cli

    cli._positive(int)("0")


# label -> (trigger, exception class, pattern). A trigger takes no argument, or pytest fixtures by name.
# The label says what the user did; the test checks the class and the text, not where the raise is.
MESSAGES = {
    'already transformed by simfx call simfx.strip': (lambda: simfx.transform(_sim(), X), TypeError, r"already transformed by simfx; call simfx\.strip"),
    'needs example_inputs for TinyResNet torch.randn': (lambda: simfx.transform(TinyResNet()), simfx.ExampleInputsError, r"needs example_inputs for TinyResNet.*torch\.randn"),
    'must be a tensor a tuple got': (lambda: simfx.transform(TinyResNet(), 3), simfx.ExampleInputsError, r"must be a tensor, a tuple.*got int"),
    'TinyResNet holds no tensor pass': (lambda: simfx.transform(TinyResNet(), (1,)), simfx.ExampleInputsError, r"TinyResNet holds no tensor; pass"),
    'must be positive got': (_cli_positive, argparse.ArgumentTypeError, r"must be positive, got 0"),
    'Block.forward is decorated with forward_with_sim_cache but its': (lambda: _compat_forward(decorate_init=False), TypeError, r"Block\.forward is decorated with forward_with_sim_cache but its __init__ is not.*add @init_proj"),
    'Block init_proj sim_cfg=... must be a dict': (lambda: _compat_class("width", sim_cfg=3), TypeError, r"Block: init_proj\(sim_cfg=\.\.\.\) must be a dict, got int"),
    'Block unknown init_proj sim_cfg key s bogus': (lambda: _compat_class("width", sim_cfg={"bogus": 1}), ValueError, r"Block: unknown init_proj sim_cfg key\(s\) \['bogus'\]; valid keys"),
    'Block proj_type=nope is not InvSS register_objective': (lambda: _compat_class("width", proj_type="nope"), ValueError, r"Block: proj_type='nope' is not 'InvSS'.*register_objective"),
    'Block token_sampling_type=v9 is not one of v0': (lambda: _compat_class("width", token_sampling_type="v9"), ValueError, r"Block: token_sampling_type='v9' is not one of \['v0', 'v1', 'v2'\]"),
    'Block token_sampling_type=v2 ranks tokens by the blocks': (lambda: _compat_class("width", proj_type="self_model", token_sampling_type="v2"), ValueError, r"Block: token_sampling_type='v2' ranks tokens by the block's input.*use 'v0'"),
    'Block loss_type=l3 is not one of': (lambda: _compat_class("width", loss_type="l3"), ValueError, r"Block: loss_type='l3' is not one of"),
    'Block init_proj sim_cfg dim must be a': (lambda: _compat_class("width", sim_cfg={"dim": 0}), ValueError, r"Block: init_proj sim_cfg: dim must be a positive int"),
    'Block token_sampling_ratio must be a number got': (lambda: _compat_class("width", token_sampling_ratio="a"), TypeError, r"Block: token_sampling_ratio must be a number, got 'a'"),
    'Block token_sampling_ratio=16 is above count tokens-per-sample': (lambda: _compat_class("width", token_sampling_ratio=16), ValueError, r"Block: token_sampling_ratio=16 is above 1.*count / tokens-per-sample"),
    'Block channel_sampling_ratio must be in got': (lambda: _compat_class("width", channel_sampling_ratio=0), ValueError, r"Block: channel_sampling_ratio must be in \(0, 1\], got 0"),
    'Owner already has an attribute simfx rename': (lambda: _attach_over_existing(), ValueError, r"Owner already has an attribute 'simfx'.*rename that attribute"),
    'Block init_proj input_dim_name=channels reads self.channels Set self.channels': (lambda: _compat_class("channels")(), AttributeError, r"Block: init_proj\(input_dim_name='channels'\) reads self\.channels.*Set self\.channels"),
    'Block init_proj input_dim_name must be an attribute': (lambda: _compat_class(1.5)(), TypeError, r"Block: init_proj input_dim_name must be an attribute name or an int, got 1\.5"),
    'Block init_proj input_dim_name=width gives it must be': (lambda: _compat_class("width", width_attr=0)(), ValueError, r"Block: init_proj input_dim_name='width' gives 0; it must be a positive int"),
    'Block.forward is decorated with forward_with_sim_cache which needs': (lambda: _compat_forward("width", forward_returns="tuple"), TypeError, r"Block\.forward is decorated with forward_with_sim_cache, which needs a tensor.*got Tensor -> tuple"),
    'Block SIM needs a batch axis and': (lambda: _compat_forward(8, x=torch.randn(8)), ValueError, r"Block.*SIM needs a batch axis and a channel axis"),
    'Block sim_cfg channel_dim=0 must name a non-batch': (lambda: _compat_forward(8, sim_cfg={"channel_dim": 0}), ValueError, r"Block.*sim_cfg channel_dim=0 must name a non-batch axis in 1\.\.2"),
    'says channels no single axis fits channel_dim': (lambda: _compat_forward(6, x=torch.randn(2, 5, 8).transpose(1, 2).contiguous().transpose(1, 2)[..., :8]), ValueError, r"says 6 channels: no single axis fits.*channel_dim"),
    'simfx demo needs scikit-learn pip install scikit-learn': (_without_module("sklearn.datasets", lambda: __import__("simfx.demo").demo.load_digits()), ImportError, r"simfx demo needs scikit-learn.*pip install scikit-learn"),
    'simfx.draw expects the module simfx.transform returned got': (lambda: simfx.draw(nn.Linear(2, 2), "g.svg"), TypeError, r"simfx\.draw expects the module simfx\.transform returned, got Linear"),
    'engine must be auto dot or matplotlib': (lambda: simfx.draw(_sim(), "g.svg", engine="tikz"), ValueError, r"engine must be 'auto', 'dot' or 'matplotlib', got 'tikz'"),
    'writes svg png or dot files got': (lambda: simfx.draw(_sim(), "g.pdf"), ValueError, r"writes \.svg, \.png or \.dot files; got 'g\.pdf'"),
    'engine=dot needs graphvizs dot on PATH engine=auto': (_dot_missing, RuntimeError, r"engine='dot' needs graphviz's `dot` on PATH.*engine='auto' falls back"),
    'graphviz dot failed use engine=matplotlib': (_dot_fails, RuntimeError, r"graphviz dot failed.*use engine='matplotlib'"),
    'simfx.explain expects the module simfx.transform returned got': (lambda: simfx.explain(nn.Linear(2, 2)), TypeError, r"simfx\.explain expects the module simfx\.transform returned, got Linear; .*simfx\.find_boundaries"),
    'to_networkx expects a torch.fx.GraphModule got Linear': (lambda: simfx.to_networkx(nn.Linear(2, 2)), TypeError, r"to_networkx expects a torch\.fx\.GraphModule.*got Linear"),
    'graph_diff expects the module simfx.transform returned got': (lambda: simfx.graph_diff(nn.Linear(2, 2)), TypeError, r"graph_diff expects the module simfx\.transform returned, got Linear"),
    'ReLU has no layer weight weight_std measures': (lambda: simfx.metrics.weight_std(nn.ReLU()), ValueError, r"ReLU has no layer weight.*weight_std measures conv, linear and attention"),
    'torch.export could not capture DataDependent train mode': (lambda: simfx.transform(DataDependent(), torch.randn(2, 4), frontend="export"), simfx.TraceError, r"torch\.export could not capture DataDependent \(train mode\).*Fix: .*torch\.cond"),
    'frontend=jit is not one of auto fx': (lambda: simfx.transform(TinyResNet(), X, frontend="jit"), ValueError, r"frontend='jit' is not one of \('auto', 'fx', 'export', 'calls'\)"),
    'DataDependent simfx also tried torch.export frontend=auto': (lambda: simfx.transform(DataDependent(), torch.randn(2, 4)), simfx.TraceError, r"DataDependent.*simfx also tried torch\.export \(frontend='auto'\)"),
    'input-shape takes comma-separated integers like got a': (lambda: model_spec.parse_shape("a,b"), model_spec.SpecError, r"--input-shape takes comma-separated integers like 2,3,224,224; got 'a,b'"),
    'input-shape needs a batch axis': (lambda: model_spec.parse_shape("3"), model_spec.SpecError, r"--input-shape needs a batch axis"),
    'model-arg takes KEY=VALUE got size': (lambda: model_spec.parse_model_args(["size"]), model_spec.SpecError, r"--model-arg takes KEY=VALUE.*got 'size'"),
    'MODEL must look like torchvision resnet50 got': (lambda: model_spec.load_model("resnet50"), model_spec.SpecError, r"MODEL must look like torchvision:resnet50.*got 'resnet50'"),
    'torchvision has no model resnet5': (lambda: model_spec.load_model("torchvision:resnet5"), model_spec.SpecError, r"torchvision has no model 'resnet5'"),
    'torchvision resnet18 rejected model-arg bogus': (lambda: model_spec.load_model("torchvision:resnet18", {"bogus": 1}), model_spec.SpecError, r"torchvision:resnet18 rejected --model-arg \{'bogus': 1\}"),
    'timm is not installed pip install timm': (_without_module("timm", lambda: model_spec.load_model("timm:resnet18")), model_spec.SpecError, r"timm is not installed; pip install timm"),
    'timm has no model resnet_nonexistent': (_with_module("timm", lambda: model_spec.load_model("timm:resnet_nonexistent")), model_spec.SpecError, r"timm has no model 'resnet_nonexistent'"),
    'no such file missing_dir none.py from MODEL': (lambda: model_spec.load_model("missing_dir/none.py:make"), model_spec.SpecError, r"no such file 'missing_dir/none\.py' \(from MODEL"),
    'cannot import simfx_no_such_module from MODEL simfx_no_such_module make': (lambda: model_spec.load_model("simfx_no_such_module:make"), model_spec.SpecError, r"cannot import 'simfx_no_such_module' \(from MODEL 'simfx_no_such_module:make'\)"),
    'has no callable make callables there build': (lambda tmp_path: _factory_file(tmp_path, "def build():\n    pass\n"), model_spec.SpecError, r"has no callable 'make'; callables there: build"),
    'returned int a factory must return an': (lambda tmp_path: _factory_file(tmp_path, "def make():\n    return 3\n"), model_spec.SpecError, r"returned int; a factory must return an nn\.Module"),
    'objective factory for x must be callable': (lambda: objectives.register_objective("x", 3), TypeError, r"objective factory for 'x' must be callable, got 3"),
    'objective rho_sim is already registered pass overwrite=True': (_register_twice, ValueError, r"objective 'rho_sim' is already registered; pass overwrite=True"),
    'objective name must be a non-empty string': (lambda: objectives.register_objective(""), TypeError, r"objective name must be a non-empty string, got ''"),
    'unknown objective nope registered objectives are simfx.register_objective': (lambda: simfx.transform(TinyResNet(), X, objective="nope"), ValueError, r"unknown objective 'nope'; registered objectives are \[.*simfx\.register_objective\('nope'"),
    'objective simfx_test_not_a_module factory returned int not an': (_objective_factory_returns_a_non_module, TypeError, r"objective 'simfx_test_not_a_module' factory returned int, not an nn\.Module"),
    'token_sampling=all is not one of': (lambda: simfx.transform(TinyResNet(), X, token_sampling="all"), ValueError, r"token_sampling='all' is not one of"),
    'loss=l3 is not one of': (lambda: simfx.transform(TinyResNet(), X, loss="l3"), ValueError, r"loss='l3' is not one of"),
    'dim must be a positive int got': (lambda: simfx.transform(TinyResNet(), X, dim=0), ValueError, r"dim must be a positive int, got 0"),
    'beta must be a number got str': (lambda: simfx.transform(TinyResNet(), X, beta="high"), TypeError, r"beta must be a number, got str"),
    'channel_dim must be None an int or': (lambda: simfx.transform(TinyResNet(), X, channel_dim=(1, 2, 3)), ValueError, r"channel_dim must be None, an int, or an \(input, output\) pair"),
    'unknown SIM option s ratio valid options': (lambda: SimOptions().replace(ratio=0.5), TypeError, r"unknown SIM option\(s\) \['ratio'\]; valid options are"),
    'token_ratio must be a number in got': (lambda: SimOptions(token_ratio="half"), TypeError, r"token_ratio must be a number in \(0, 1\], got 'half'"),
    'channel_ratio must be in got': (lambda: SimOptions(channel_ratio=1.5), ValueError, r"channel_ratio must be in \(0, 1\], got 1\.5"),
    'already has a submodule named simfx simfx.strip': (lambda: simfx.transform(HasSimfx(), X), ValueError, r"already has a submodule named 'simfx'.*simfx\.strip\(module\) first, or rename"),
    'block blocks.0 token_sampling=topk_mean activation_l2 overrides=': (lambda: simfx.transform(TinyResNet(), X, objective="activation_l2", token_sampling="topk_mean"), ValueError, r"block 'blocks\.0': token_sampling='topk_mean'.*'activation_l2'.*overrides="),
    'channel_dim=0 for the input of block blocks.0': (lambda: simfx.transform(TinyResNet(), X, channel_dim=0), ValueError, r"channel_dim=0 for the input of block 'blocks\.0' \(shape \(2, 8, 8, 8\)\) must name a non-batch axis"),
    'simfx.strip expects a module returned by simfx.transform': (lambda: simfx.strip(nn.Linear(2, 2)), TypeError, r"simfx\.strip expects a module returned by simfx\.transform, got Linear"),
    'blocks selector layer matched no block. Eligible': (lambda: simfx.transform(TinyResNet(), X, blocks="layer*"), simfx.SelectorError, r"blocks selector 'layer\*' matched no block\. Eligible block names: stem, .*blocks\.0.*simfx\.find_boundaries"),
    'blocks selector act matched only blocks that': (lambda: simfx.transform(InplaceRelu(), X, blocks="act"), simfx.SelectorError, r"blocks selector 'act' matched only blocks that cannot take SIM: 'act': modifies its input .* in place.*find_boundaries"),
    'exclude selector nothing matched no block. Eligible': (lambda: simfx.transform(TinyResNet(), X, exclude="nothing"), simfx.SelectorError, r"exclude selector 'nothing' matched no block\. Eligible block names: .*blocks\.0"),
    'overrides selector stem matched none of the': (lambda: simfx.transform(TinyResNet(), X, overrides={"stem": {"dim": 8}}), simfx.SelectorError, r"overrides selector 'stem' matched none of the selected blocks \(blocks\.0, blocks\.1, blocks\.2\)"),
    'no eligible block Linear Pass blocks=': (lambda: simfx.transform(nn.Sequential(nn.Linear(4, 2)), torch.randn(3, 4), frontend="fx"), simfx.NoEligibleBlockError, r"no eligible block.*0 \(Linear\): .*Fix: pass blocks=\[\.\.\.\]"),
    'a selector must be a module class': (lambda: simfx.transform(TinyResNet(), X, blocks=[3]), TypeError, r"a selector must be a module class, a name glob, a compiled regex or a predicate; got 3"),
    'blocks= takes a selector or a list': (lambda: simfx.transform(TinyResNet(), X, blocks=3), TypeError, r"blocks= takes a selector or a list of selectors, got int"),
    'overrides blocks.0 must be a dict of': (lambda: simfx.transform(TinyResNet(), X, overrides={"blocks.0": 0.5}), TypeError, r"overrides\['blocks\.0'\] must be a dict of SIM options, e\.g\. \{'token_ratio': 0\.5\}"),
    'TinyResNet cannot run on the example inputs': (lambda: simfx.transform(TinyResNet(), torch.randn(2, 4, 8, 8)), simfx.ExampleInputsError, r"TinyResNet cannot run on the example inputs \(\(2, 4, 8, 8\).*at node 'stem'.*Pass example_inputs shaped like"),
    'topk_mean for an objective that never reads the input': (_topk_for_an_objective_without_input, ValueError, r"token_sampling='topk_mean' ranks tokens by the block's input, which objective 'self_model' does not read \(uses_input=False\); use token_sampling='shared' or 'per_sample'"),
    'unregister an objective that is not registered': (lambda: objectives.OBJECTIVES.unregister("nope"), ValueError, r"no objective 'nope' is registered; registered objectives are \["),
    'unregister a leaf module that is not registered': (lambda: simfx.LEAF_MODULES.unregister(nn.ReLU), ValueError, r"ReLU.* is not a registered leaf module"),
    'register_leaf_module expects an nn.Module subclass got': (lambda: simfx.register_leaf_module(3), TypeError, r"register_leaf_module expects an nn\.Module subclass, got 3"),
    'register_autowrap_function expects a function got': (lambda: simfx.register_autowrap_function(3), TypeError, r"register_autowrap_function expects a function, got 3"),
    'simfx expects a torch.nn.Module got str': (lambda: simfx.transform("resnet", X), TypeError, r"simfx expects a torch\.nn\.Module, got str"),
    'leaf_modules takes module classes or qualified names': (lambda: simfx.transform(TinyResNet(), X, leaf_modules=[3]), TypeError, r"leaf_modules takes module classes or qualified names, got \[3\]"),
    'leaf_modules names block9 are not submodules of': (lambda: simfx.transform(TinyResNet(), X, leaf_modules=["block9"]), ValueError, r"leaf_modules names \['block9'\] are not submodules of TinyResNet; use qualified names"),
    'simfx already made modules opaque automatically a': (_trace_with_many_opaque, simfx.TraceError, r"simfx already made 1 modules opaque automatically \(a, \.\.\.\) and stopped; pass leaf_modules"),
    'example_inputs do not fit TinyResNet.forward it has': (lambda: simfx.transform(TinyResNet(), {"images": X}, frontend="fx"), TypeError, r"example_inputs do not fit TinyResNet\.forward\(.*\): it has no parameter 'images'"),
    'example_inputs do not fit TinyResNet.forward Pass the': (lambda: simfx.transform(TinyResNet(), (X, X), frontend="fx"), TypeError, r"example_inputs do not fit TinyResNet\.forward\(.*Pass the forward's positional arguments as a tuple"),
    "could not trace TwoUntraceable inside module a UntraceableChild leaf_modules": (
        lambda: simfx.transform(TwoUntraceable(), torch.randn(2, 4), frontend="fx", auto_opaque=False), simfx.TraceError, r"could not trace TwoUntraceable: inside module 'a' \(.*UntraceableChild\).*x\.sum\(\) > 0.*leaf_modules=\[UntraceableChild\]"),
    "trace_model of a non-module": (lambda: trace.trace_model("resnet"), TypeError, r"simfx expects a torch\.nn\.Module, got str"),
    "no eligible block under auto names both frontends": (
        lambda: simfx.transform(nn.Sequential(nn.Linear(4, 2)), torch.randn(3, 4)), simfx.NoEligibleBlockError, r"no eligible block.*simfx also tried torch\.export \(frontend='auto'\)"),
    "random draw in the models own forward": (
        lambda: simfx.transform(RandomRoot(), X, frontend="fx"), simfx.FaithfulnessError, r"RandomRoot faithfully: the model's own forward draws a random number.*random\.random.*test_messages\.py:\d+.*move that code into a submodule"),
    "training graph differs from the model": (
        lambda: simfx.transform(TensorCheck(), X, frontend="fx"), simfx.FaithfulnessError, r"training graph for TensorCheck \(fx frontend\) does not compute what the model computes.*output tensor differs.*leaf_modules|output tensor differs"),
    "a block checkpointed with use_reentrant=True, when the model trains itself": (
        _reentrant_checkpointing_switched_on_after_transform, simfx.FaithfulnessError,
        r"block 'blocks\.0' ran with gradients off in a training step \(inside torch\.no_grad\(\) or a reentrant "
        r"torch\.utils\.checkpoint\).*use_reentrant=False.*exclude=\['blocks\.0'\]"),
    "a block torch.export saw but the model's own forward does not run": (
        _a_block_only_export_runs, simfx.FaithfulnessError,
        r"could not read 1 chosen block\(s\) of SkipsWhenNotExporting when the model ran on the example inputs: "
        r"'blocks\.2' \(input at argument x of 'blocks\.2', output at the result of 'blocks\.2'\).*exclude"),
    "an objective with a parameter its loss does not use": (
        _objective_with_an_unused_parameter, simfx.FaithfulnessError,
        r"reconstructor parameters 'blocks_0\.objective\.scale'.* get no gradient when TinyResNet trains"),
    "a training call of a traced graph with a keyword the example lacked": (
        _fx_training_call_with_a_keyword_the_example_lacked, TypeError,
        r"MaskedLinear's training graph was traced with the example's call \(1 positional argument\(s\); graph "
        r"inputs: x\), and this call has keyword argument 'mask', which the example did not pass\. Transform with "
        r"an example that passes what training passes"),
    "module calls captured from a forward that calls no submodule": (
        lambda: simfx.transform(NoSubmoduleCall(), torch.randn(2, 4), frontend="calls"), simfx.TraceError,
        r"NoSubmoduleCall's forward calls no submodule on the example inputs, so there is no block for SIM to read "
        r"at a module call"),
    "the module calls' probe, on an example the model cannot train on": (
        lambda: simfx.transform(TinyBatchNormNet(), torch.randn(1, 4), frontend="calls"), simfx.TraceError,
        r"TinyBatchNormNet raised on the example inputs in training mode \(ValueError: Expected more than 1 value "
        r"per channel when training.*pass example inputs a training step runs on"),
    "hooks registered after transform on traced code": (
        _hook_after_transform, simfx.FaithfulnessError, r"module 'blocks' has hooks, registered after simfx\.transform.*leaf_modules=\['blocks'\]"),
    "traced module switched mode": (
        _traced_flag_changed, simfx.FaithfulnessError, r"module '2' is in eval mode, but traced code read its self\.training as in training mode.*leaf_modules=\['2'\]"),
    "backward hooks on the model itself": (
        _root_backward_hook, simfx.FaithfulnessError, r"TinyResNet has backward hooks on the model itself.*Register them on a submodule"),
    "pre-hook changes the models non-tensor arguments": (
        _root_pre_hook_adds_an_argument, simfx.FaithfulnessError, r"a forward pre-hook of TinyResNet changed the model's non-tensor arguments"),
    "pre-hook with kwargs returns neither None nor a pair": (
        _root_pre_hook_returns_a_bad_value, RuntimeError, r"forward pre-hook must return None or a tuple of \(new_args, new_kwargs\)"),
    "train with a non-boolean mode": (lambda: _sim().train("yes"), ValueError, r"training mode is expected to be boolean"),
    "beta not finite": (lambda: simfx.transform(TinyResNet(), X, beta=float("nan")), ValueError, r"beta must be a finite number >= 0.*beta=0 to log"),
    "a numpy boolean as a number option": (lambda: SimOptions(dim=np.bool_(True)), TypeError, r"dim must be a number, got a boolean bool"),
    "DataParallel-wrapped model": (
        lambda: simfx.transform(nn.DataParallel(TinyResNet()), X), simfx.UnsupportedModelError, r"DataParallel-wrapped model.*simfx\.transform\(model\.module, example_inputs\); model = DataParallel\(sim"),
    "FSDP-wrapped model": (
        lambda: simfx.transform(_stand_in("FullyShardedDataParallel"), X), simfx.UnsupportedModelError, r"FSDP-wrapped model; transform the plain module first"),
    "TorchScript module": (
        lambda: simfx.transform(_scripted(), torch.randn(2, 4)), simfx.UnsupportedModelError, r"TorchScript module.*simfx\.strip\(sim\)"),
    "loss_in_output on a model returning a tensor": (
        lambda: simfx.transform(TinyResNet(), X, loss_in_output=True)(X), TypeError,
        r"loss_in_output=True\) needs a model returning a dict or a ModelOutput; TinyResNet returned Tensor"),
    "primary_input below zero": (lambda: SimOptions(primary_input=-1), ValueError, r"primary_input must be None or a position >= 0 among the block's tensors, got -1"),
    "primary_input past the blocks inputs": (
        lambda: simfx.transform(TinyResNet(), X, blocks=["blocks.0"], overrides={"blocks.0": {"primary_input": 3}}),
        simfx.SelectorError, r"block 'blocks\.0': primary_input=3, but it has 1 tensor input\(s\): 0: stem \(2, 8, 8, 8\)"),
    "primary_input on a tensor SIM cannot read": (
        lambda: simfx.transform(IntContext(), X, blocks=["block"], overrides={"block": {"primary_input": 1}}),
        simfx.SelectorError, r"block 'block': primary_input=1 names .* torch\.int64; SIM needs a floating-point tensor"),
    "training graph that cannot train": (
        _graph_that_cannot_train, simfx.FaithfulnessError, r"training graph for TinyResNet \(fx frontend\) cannot take a training step.*Fix: try frontend='export'"),
    "fully_shard before transform": (
        lambda: simfx.transform(nn.Sequential(_stand_in("FSDPModule"), nn.Conv2d(4, 2, 1)), X), simfx.UnsupportedModelError, r"fully_shard was applied to '0' before simfx\.transform.*Transform first"),
    "export fails on a cache output": (
        _with_module("transformers", _returns_a_cache), simfx.TraceError,
        r"torch\.export could not capture ReturnsCache \(train mode\).*Fix: the forward returns a DynamicCache object.*pass use_cache=False"),
    "export fails on data-dependent control flow, at the users line": (
        lambda: simfx.transform(DataDependent(), torch.randn(2, 4), frontend="export"), simfx.TraceError,
        r"could not capture DataDependent \(train mode\) at test_messages\.py:\d+ `return self\.fc\(x\) if x\.sum\(\) > 0 else -x`.*Fix: Python control flow on a tensor's value cannot be exported; rewrite it with torch\.cond"),
    "fx fails in a private helper: no autowrap of a private name": (
        lambda: simfx.transform(PrivateHelper(), torch.randn(2, 4), frontend="fx"), simfx.TraceError,
        r"\A(?!.*autowrap_functions=\[_).*could not trace PrivateHelper\.forward at test_messages\.py:\d+.*Fix: _clamp_rows\(\) cannot go in autowrap_functions, because torch\.fx skips functions whose name starts with '_': call it through a public module-level function .* autowrap_functions=\[helper\]"),
    "no eligible block: an opaque encoder hides its layers, and why": (
        lambda: simfx.transform(OpaqueEncoderOnly(), torch.randn(2, 3, 4), frontend="fx"), simfx.NoEligibleBlockError,
        r"enc \(BranchingEncoder\): produces the model's output\nThese run as one call, so no layer inside them can take SIM:\n  enc \(BranchingEncoder, 2 weight layers\): made opaque: .* at test_messages\.py:\d+ `x = layer\(x\) if x\.sum\(\) > 0 else layer\(-x\)`\nFix: change the code named there"),
    "a config switching on LayerDrop: the error names the option": (
        lambda: simfx.transform(LayerDropConfig(), torch.randn(2, 3, 4), frontend="fx"), simfx.FaithfulnessError,
        r"LayerDropConfig faithfully: the model's own forward draws a random number.*\nNote: LayerDropConfig's config switches on randomness .*: layerdrop=0\.1 \(LayerDrop\).*model\.config\.layerdrop = 0\.0"),
}

# Raise sites with no message test, by the exception they raise, and why.
EXEMPT = {
    "SystemExit": "exits with the CLI's return code; tests/test_cli.py covers the CLI's messages",
    "AssertionError": "internal invariants between stages (a planned block the analysis found readable)",
    "_NodeFailed": "internal: propagate_shapes turns it into the ExampleInputsError tested above",
}


# --- the stack integrations (simfx.integrations.*): each row needs its library --------


def _sim_loss_callback(model, **arguments):
    from types import SimpleNamespace

    from simfx.integrations.transformers import SimLossCallback

    SimLossCallback().on_train_begin(SimpleNamespace(**arguments), None, None, model=model)


def _old_ultralytics(monkeypatch):
    ultralytics = pytest.importorskip("ultralytics")
    from simfx.integrations.ultralytics import SimDetectionTrainer

    monkeypatch.setattr(ultralytics, "__version__", "8.4.0")
    SimDetectionTrainer()


class DictOutput(TinyResNet):
    """Returns a dict, as Hugging Face models return ModelOutputs."""

    def forward(self, x):
        return {"logits": super().forward(x)}


class DictOutputTakingKwargs(DictOutput):
    """Takes **kwargs, as Hugging Face models do (the Trainer then passes num_items_in_batch)."""

    def forward(self, x, **kwargs):
        return super().forward(x)


MESSAGES.update({
    "SimLossCallback with gradient accumulation and no num_items_in_batch in the example": (
        _with_module("transformers", lambda: _sim_loss_callback(
            simfx.transform(DictOutputTakingKwargs(), X, loss_in_output=True), gradient_accumulation_steps=2)),
        ValueError, r"gradient_accumulation_steps=2: transformers\.Trainer passes num_items_in_batch to "
        r"DictOutputTakingKwargs, .*Add it to the example: .*'num_items_in_batch': torch\.tensor\(n\)"),
    "SimLossCallback with a model simfx did not transform": (
        _with_module("transformers", lambda: _sim_loss_callback(nn.Linear(2, 2))), TypeError,
        r"SimLossCallback needs the Trainer's model to be a module from simfx\.transform\(\.\.\., loss_in_output=True\); "
        r"got Linear\. Transform the model"),
    "SimLossCallback with a model transformed without loss_in_output": (
        _with_module("transformers", lambda: _sim_loss_callback(_sim())), ValueError,
        r"SimLossCallback needs simfx\.transform\(\.\.\., loss_in_output=True\): transformers\.Trainer reads the loss"),
    "SimLossCallback with label smoothing, which ignores outputs.loss": (
        _with_module("transformers", lambda: _sim_loss_callback(
            simfx.transform(DictOutput(), X, loss_in_output=True), label_smoothing_factor=0.1)), ValueError,
        r"label_smoothing_factor=0\.1: .*ignores outputs\.loss, so sim_loss would not be trained\. Pass "
        r"compute_loss_func=.*outputs\['sim_loss'\]"),
    "SimDetectionTrainer with compile, which takes the loss out of the model's forward": (
        _with_module("ultralytics", lambda: __import__("simfx.integrations.ultralytics").integrations.ultralytics
                     .SimDetectionTrainer(overrides={"compile": True})), ValueError,
        r"SimDetectionTrainer does not support compile=True: Ultralytics then computes the loss outside the model's "
        r"forward, where SIM is not\. Train without it"),
    "SimDetectionTrainer with an Ultralytics older than 8.4.104": (
        _old_ultralytics, ImportError, r"SimDetectionTrainer needs ultralytics>=8\.4\.104 .*found 8\.4\.0\. Upgrade: pip install -U ultralytics"),
    "a name simfx.integrations.transformers does not have": (
        lambda: __import__("simfx.integrations.transformers").integrations.transformers.Trainer, AttributeError,
        r"module 'simfx\.integrations\.transformers' has no attribute 'Trainer'"),
    "a name simfx.integrations.ultralytics does not have": (
        lambda: __import__("simfx.integrations.ultralytics").integrations.ultralytics.SegmentationTrainer,
        AttributeError, r"module 'simfx\.integrations\.ultralytics' has no attribute 'SegmentationTrainer'"),
})


def _attach_over_existing():
    class Owner(nn.Module):
        @compat.init_proj(8)
        def __init__(self):
            super().__init__()
            self.simfx = nn.Linear(8, 8)

    Owner()


def _raise_sites() -> dict[tuple[str, int], str]:
    """``(path in the package, line)`` -> the raised expression, for every ``raise SomeError(...)``."""
    sites: dict[tuple[str, int], str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                sites[(relative, node.lineno)] = ast.unparse(node.exc.func)
    return sites


def _raise_site(error: BaseException) -> tuple[str, int]:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if PACKAGE in pathlib.Path(f.filename).parents]
    assert frames, f"{type(error).__name__} was not raised inside simfx: {error}"
    return pathlib.Path(frames[-1].filename).relative_to(PACKAGE).as_posix(), frames[-1].lineno


REACHED: dict[str, tuple[str, int]] = {}  # label -> the raise site its trigger reached


def _trigger(label, fixture) -> BaseException:
    trigger, error_class, pattern = MESSAGES[label]
    names = trigger.__code__.co_varnames[: trigger.__code__.co_argcount]
    with pytest.raises(error_class) as caught:
        trigger(*(fixture(name) for name in names))
    REACHED[label] = _raise_site(caught.value)
    return caught.value


@pytest.mark.parametrize("label", sorted(MESSAGES))
def test_message(label, request):
    error = _trigger(label, request.getfixturevalue)
    pattern = MESSAGES[label][2]
    assert re.search(pattern, str(error), re.S), f"{label}: message does not match {pattern!r}:\n{error}"


def test_every_raise_site_has_a_message_test(tmp_path_factory):
    skipped = 0
    for label in MESSAGES:  # rows not run in this session (a -k selection): run them now, each on its own
        if label not in REACHED:
            with pytest.MonkeyPatch.context() as monkeypatch:
                fixtures = {"monkeypatch": monkeypatch, "tmp_path": tmp_path_factory.mktemp("message")}
                try:
                    _trigger(label, fixtures.__getitem__)
                except pytest.skip.Exception:
                    skipped += 1  # an optional library is missing, or this torch has no such failure
    if skipped:
        pytest.skip(f"{skipped} message rows cannot run here (an optional library missing, or this torch version)")
    reached = set(REACHED.values())
    missing = [
        f"  simfx/{path} line {line}: raise {raised}(...)"
        for (path, line), raised in _raise_sites().items()
        if (path, line) not in reached and raised.split(".")[-1] not in EXEMPT
    ]
    assert not missing, (
        "raise sites no message test reaches; add a row 'label': (trigger, ErrorClass, pattern) to "
        "MESSAGES in tests/test_messages.py (or the exception to EXEMPT with a reason):\n" + "\n".join(missing)
    )
