"""Every error simfx raises, raised on purpose and checked for its text.

``MESSAGES`` maps each raise site of the package to a trigger and a pattern the
message must match: it names the module, node, option or value involved, what
was expected, and (where there is a choice) what to do. The meta-test at the
bottom scans ``simfx/*.py`` for ``raise SomeError(...)`` and fails, naming the
site, when one has no entry here: adding a raise means adding a row.

A site's id is ``file:function:Exception#n`` (the n-th raise of that exception
type in that function, in source order). Each trigger must raise from that very
function: the test checks the innermost simfx frame of the traceback.
"""

from __future__ import annotations

import ast
import collections
import importlib
import pathlib
import re
import sys
import traceback

import pytest
import torch
from torch import nn

import simfx
from simfx import compat, model_spec, objectives, trace
from simfx.options import SimOptions

from conftest import TinyResNet

PACKAGE = pathlib.Path(simfx.__file__).parent
draw_module = importlib.import_module("simfx.draw")  # simfx.draw is the function
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


class InplaceRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean((2, 3)))


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
    objectives.register_objective("simfx_test_not_a_module", lambda cin, cout, o: 3, overwrite=True)
    try:
        objectives.build_objective(SimOptions(objective="simfx_test_not_a_module"),
                                   in_channel_dim=1, out_channel_dim=1, in_width=4, out_width=4)
    finally:
        objectives._REGISTRY.pop("simfx_test_not_a_module", None)


def _topk_without_input_at_runtime():
    head = objectives.build_objective(SimOptions(objective="self_model", token_sampling="topk_mean"),
                                      in_channel_dim=1, out_channel_dim=1, in_width=4, out_width=4)
    head(torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6))


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
    monkeypatch.setattr(draw_module.shutil, "which", lambda name: None)
    simfx.draw(_sim(), "graph.svg", engine="dot")


def _dot_fails(tmp_path):
    draw_module._run_dot("false", "digraph {}", tmp_path / "g.svg", "svg")


def _factory_file(tmp_path, source, attr="make"):
    path = tmp_path / "user_model.py"
    path.write_text(source)
    model_spec.load_model(f"{path}:{attr}")


def _cli_positive():
    from simfx import cli

    cli._positive(int)("0")


# id -> (trigger, pattern). A trigger takes no argument, or pytest fixtures by name.
MESSAGES = {
    # api.py
    "api.py:transform:TypeError#1": (lambda: simfx.transform(_sim(), X), r"already transformed by simfx; call simfx\.strip"),
    "api.py:_example_inputs:ExampleInputsError#1": (lambda: simfx.transform(TinyResNet()), r"needs example_inputs for TinyResNet.*torch\.randn"),
    "api.py:_example_inputs:ExampleInputsError#2": (lambda: simfx.transform(TinyResNet(), 3), r"must be a tensor, a tuple.*got int"),
    "api.py:_example_inputs:ExampleInputsError#3": (lambda: simfx.transform(TinyResNet(), (1,)), r"TinyResNet holds no tensor; pass"),
    # cli.py
    "cli.py:_positive.parse:argparse.ArgumentTypeError#1": (_cli_positive, r"must be positive, got 0"),
    # compat.py
    "compat.py:forward_with_sim_cache.decorator.wrapper:TypeError#1": (
        lambda: _compat_forward(decorate_init=False), r"Block\.forward is decorated with forward_with_sim_cache but its __init__ is not.*add @init_proj"),
    "compat.py:_options:TypeError#1": (lambda: _compat_class("width", sim_cfg=3), r"Block: init_proj\(sim_cfg=\.\.\.\) must be a dict, got int"),
    "compat.py:_options:ValueError#1": (lambda: _compat_class("width", sim_cfg={"bogus": 1}), r"Block: unknown init_proj sim_cfg key\(s\) \['bogus'\]; valid keys"),
    "compat.py:_options:ValueError#2": (lambda: _compat_class("width", proj_type="nope"), r"Block: proj_type='nope' is not 'InvSS'.*register_objective"),
    "compat.py:_options:ValueError#3": (lambda: _compat_class("width", token_sampling_type="v9"), r"Block: token_sampling_type='v9' is not one of \['v0', 'v1', 'v2'\]"),
    "compat.py:_options:ValueError#4": (
        lambda: _compat_class("width", proj_type="self_model", token_sampling_type="v2"), r"Block: token_sampling_type='v2' ranks tokens by the block's input.*use 'v0'"),
    "compat.py:_options:ValueError#5": (lambda: _compat_class("width", loss_type="l3"), r"Block: loss_type='l3' is not one of"),
    "compat.py:_options:type(error)#1": (lambda: _compat_class("width", sim_cfg={"dim": 0}), r"Block: init_proj sim_cfg: dim must be a positive int"),
    "compat.py:_ratio:TypeError#1": (lambda: _compat_class("width", token_sampling_ratio="a"), r"Block: token_sampling_ratio must be a number, got 'a'"),
    "compat.py:_ratio:ValueError#1": (lambda: _compat_class("width", token_sampling_ratio=16), r"Block: token_sampling_ratio=16 is above 1.*count / tokens-per-sample"),
    "compat.py:_ratio:ValueError#2": (lambda: _compat_class("width", channel_sampling_ratio=0), r"Block: channel_sampling_ratio must be in \(0, 1\], got 0"),
    "compat.py:_attach:ValueError#1": (lambda: _attach_over_existing(), r"Owner already has an attribute 'simfx'.*rename that attribute"),
    "compat.py:_width:AttributeError#1": (lambda: _compat_class("channels")(), r"Block: init_proj\(input_dim_name='channels'\) reads self\.channels.*Set self\.channels"),
    "compat.py:_width:TypeError#1": (lambda: _compat_class(1.5)(), r"Block: init_proj input_dim_name must be an attribute name or an int, got 1\.5"),
    "compat.py:_width:ValueError#1": (lambda: _compat_class("width", width_attr=0)(), r"Block: init_proj input_dim_name='width' gives 0; it must be a positive int"),
    "compat.py:_block_loss:TypeError#1": (
        lambda: _compat_forward("width", forward_returns="tuple"), r"Block\.forward is decorated with forward_with_sim_cache, which needs a tensor.*got Tensor -> tuple"),
    "compat.py:_channel_axis:ValueError#1": (lambda: _compat_forward(8, x=torch.randn(8)), r"Block.*SIM needs a batch axis and a channel axis"),
    "compat.py:_channel_axis:ValueError#2": (
        lambda: _compat_forward(8, sim_cfg={"channel_dim": 0}), r"Block.*sim_cfg channel_dim=0 must name a non-batch axis in 1\.\.2"),
    "compat.py:_channel_axis:ValueError#3": (
        lambda: _compat_forward(6, x=torch.randn(2, 5, 8).transpose(1, 2).contiguous().transpose(1, 2)[..., :8]), r"says 6 channels: no single axis fits.*channel_dim"),
    # demo.py
    "demo.py:load_digits:ImportError#1": (
        _without_module("sklearn.datasets", lambda: __import__("simfx.demo").demo.load_digits()), r"simfx demo needs scikit-learn.*pip install scikit-learn"),
    # draw.py
    "draw.py:draw:TypeError#1": (lambda: simfx.draw(nn.Linear(2, 2), "g.svg"), r"simfx\.draw expects the module simfx\.transform returned, got Linear"),
    "draw.py:draw:ValueError#1": (lambda: simfx.draw(_sim(), "g.svg", engine="tikz"), r"engine must be 'auto', 'dot' or 'matplotlib', got 'tikz'"),
    "draw.py:draw:ValueError#2": (lambda: simfx.draw(_sim(), "g.pdf"), r"writes \.svg, \.png or \.dot files; got 'g\.pdf'"),
    "draw.py:draw:RuntimeError#1": (_dot_missing, r"engine='dot' needs graphviz's `dot` on PATH.*engine='auto' falls back"),
    "draw.py:_run_dot:RuntimeError#1": (_dot_fails, r"graphviz dot failed.*use engine='matplotlib'"),
    # explain.py, graphs.py, metrics.py
    "explain.py:explain:TypeError#1": (lambda: simfx.explain(nn.Linear(2, 2)), r"simfx\.explain expects the module simfx\.transform returned, got Linear; .*simfx\.find_boundaries"),
    "graphs.py:to_networkx:TypeError#1": (lambda: simfx.to_networkx(nn.Linear(2, 2)), r"to_networkx expects a torch\.fx\.GraphModule.*got Linear"),
    "graphs.py:graph_diff:TypeError#1": (lambda: simfx.graph_diff(nn.Linear(2, 2)), r"graph_diff expects the module simfx\.transform returned, got Linear"),
    "metrics.py:weight_std:ValueError#1": (lambda: simfx.metrics.weight_std(nn.ReLU()), r"ReLU has no layer weight.*weight_std measures conv, linear and attention"),
    # export_trace.py, frontend.py
    "export_trace.py:_export:TraceError#1": (
        lambda: simfx.transform(DataDependent(), torch.randn(2, 4), frontend="export"), r"torch\.export could not capture DataDependent \(train mode\).*Fix: .*torch\.cond"),
    "frontend.py:capture:ValueError#1": (lambda: simfx.transform(TinyResNet(), X, frontend="jit"), r"frontend='jit' is not one of \('auto', 'fx', 'export'\)"),
    "frontend.py:capture:TraceError#1": (
        lambda: simfx.transform(DataDependent(), torch.randn(2, 4)), r"DataDependent.*simfx also tried torch\.export \(frontend='auto'\)"),
    # model_spec.py
    "model_spec.py:parse_shape:SpecError#1": (lambda: model_spec.parse_shape("a,b"), r"--input-shape takes comma-separated integers like 2,3,224,224; got 'a,b'"),
    "model_spec.py:parse_shape:SpecError#2": (lambda: model_spec.parse_shape("3"), r"--input-shape needs a batch axis"),
    "model_spec.py:parse_model_args:SpecError#1": (lambda: model_spec.parse_model_args(["size"]), r"--model-arg takes KEY=VALUE.*got 'size'"),
    "model_spec.py:load_model:SpecError#1": (lambda: model_spec.load_model("resnet50"), r"MODEL must look like torchvision:resnet50.*got 'resnet50'"),
    "model_spec.py:_torchvision:SpecError#1": (lambda: model_spec.load_model("torchvision:resnet5"), r"torchvision has no model 'resnet5'"),
    "model_spec.py:_torchvision:SpecError#2": (lambda: model_spec.load_model("torchvision:resnet18", {"bogus": 1}), r"torchvision:resnet18 rejected --model-arg \{'bogus': 1\}"),
    "model_spec.py:_timm:SpecError#1": (_without_module("timm", lambda: model_spec.load_model("timm:resnet18")), r"timm is not installed; pip install timm"),
    "model_spec.py:_timm:SpecError#2": (_with_module("timm", lambda: model_spec.load_model("timm:resnet_nonexistent")), r"timm has no model 'resnet_nonexistent'"),
    "model_spec.py:_factory:SpecError#1": (lambda: model_spec.load_model("missing_dir/none.py:make"), r"no such file 'missing_dir/none\.py' \(from MODEL"),
    "model_spec.py:_factory:SpecError#2": (lambda: model_spec.load_model("simfx_no_such_module:make"), r"cannot import 'simfx_no_such_module' \(from MODEL 'simfx_no_such_module:make'\)"),
    "model_spec.py:_factory:SpecError#3": (lambda tmp_path: _factory_file(tmp_path, "def build():\n    pass\n"), r"has no callable 'make'; callables there: build"),
    "model_spec.py:_factory:SpecError#4": (lambda tmp_path: _factory_file(tmp_path, "def make():\n    return 3\n"), r"returned int; a factory must return an nn\.Module"),
    # objectives.py
    "objectives.py:register_objective.add:TypeError#1": (lambda: objectives.register_objective("x", 3), r"objective factory for 'x' must be callable, got 3"),
    "objectives.py:register_objective.add:ValueError#1": (_register_twice, r"objective 'rho_sim' is already registered; pass overwrite=True"),
    "objectives.py:register_objective:TypeError#1": (lambda: objectives.register_objective(""), r"objective name must be a non-empty string, got ''"),
    "objectives.py:get_objective:ValueError#1": (lambda: simfx.transform(TinyResNet(), X, objective="nope"), r"unknown objective 'nope'; registered objectives are \[.*simfx\.register_objective\('nope'"),
    "objectives.py:build_objective:TypeError#1": (_objective_factory_returns_a_non_module, r"objective 'simfx_test_not_a_module' factory returned int, not an nn\.Module"),
    # options.py
    "options.py:SimOptions.__post_init__:ValueError#1": (lambda: simfx.transform(TinyResNet(), X, token_sampling="all"), r"token_sampling='all' is not one of"),
    "options.py:SimOptions.__post_init__:ValueError#2": (lambda: simfx.transform(TinyResNet(), X, loss="l3"), r"loss='l3' is not one of"),
    "options.py:SimOptions.__post_init__:ValueError#3": (lambda: simfx.transform(TinyResNet(), X, dim=0), r"dim must be a positive int, got 0"),
    "options.py:SimOptions.__post_init__:TypeError#1": (lambda: simfx.transform(TinyResNet(), X, beta="high"), r"beta must be a number, got str"),
    "options.py:SimOptions.__post_init__:ValueError#4": (lambda: simfx.transform(TinyResNet(), X, channel_dim=(1, 2, 3)), r"channel_dim must be None, an int, or an \(input, output\) pair"),
    "options.py:SimOptions.replace:TypeError#1": (lambda: SimOptions().replace(ratio=0.5), r"unknown SIM option\(s\) \['ratio'\]; valid options are"),
    "options.py:_check_ratio:TypeError#1": (lambda: SimOptions(token_ratio="half"), r"token_ratio must be a number in \(0, 1\], got 'half'"),
    "options.py:_check_ratio:ValueError#1": (lambda: SimOptions(channel_ratio=1.5), r"channel_ratio must be in \(0, 1\], got 1\.5"),
    # rewrite.py
    "rewrite.py:rewrite:ValueError#1": (lambda: simfx.transform(HasSimfx(), X), r"already has a submodule named 'simfx'.*simfx\.strip\(module\) first, or rename"),
    "rewrite.py:_build_head:ValueError#1": (
        lambda: simfx.transform(TinyResNet(), X, objective="activation_l2", token_sampling="topk_mean"), r"block 'blocks\.0': token_sampling='topk_mean'.*'activation_l2'.*overrides="),
    "rewrite.py:_channel_dims:ValueError#1": (lambda: simfx.transform(TinyResNet(), X, channel_dim=0), r"channel_dim=0 for the input of block 'blocks\.0' \(shape \(2, 8, 8, 8\)\) must name a non-batch axis"),
    "rewrite.py:strip:TypeError#1": (lambda: simfx.strip(nn.Linear(2, 2)), r"simfx\.strip expects a module returned by simfx\.transform, got Linear"),
    # select.py
    "select.py:select_blocks:SelectorError#1": (lambda: simfx.transform(TinyResNet(), X, blocks="layer*"), r"blocks selector 'layer\*' matched no block\. Eligible block names: stem, .*blocks\.0.*simfx\.find_boundaries"),
    "select.py:select_blocks:SelectorError#2": (
        lambda: simfx.transform(InplaceRelu(), X, blocks="act"), r"blocks selector 'act' matched only blocks that cannot take SIM: 'act': modifies its input .* in place.*find_boundaries"),
    "select.py:select_blocks:SelectorError#3": (lambda: simfx.transform(TinyResNet(), X, exclude="nothing"), r"exclude selector 'nothing' matched no block\. Eligible block names: .*blocks\.0"),
    "select.py:select_blocks:SelectorError#4": (
        lambda: simfx.transform(TinyResNet(), X, overrides={"stem": {"dim": 8}}), r"overrides selector 'stem' matched none of the selected blocks \(blocks\.0, blocks\.1, blocks\.2\)"),
    "select.py:select_blocks:NoEligibleBlockError#1": (
        lambda: simfx.transform(nn.Sequential(nn.Linear(4, 2)), torch.randn(3, 4)), r"no eligible block.*0 \(Linear\): .*Pass blocks=\[\.\.\.\]"),
    "select.py:matches:TypeError#1": (lambda: simfx.transform(TinyResNet(), X, blocks=[3]), r"a selector must be a module class, a name glob, a compiled regex or a predicate; got 3"),
    "select.py:_as_list:TypeError#1": (lambda: simfx.transform(TinyResNet(), X, blocks=3), r"blocks= takes a selector or a list of selectors, got int"),
    "select.py:_check_changes:TypeError#1": (lambda: simfx.transform(TinyResNet(), X, overrides={"blocks.0": 0.5}), r"overrides\['blocks\.0'\] must be a dict of SIM options, e\.g\. \{'token_ratio': 0\.5\}"),
    # shapes.py
    "shapes.py:propagate_shapes:ExampleInputsError#1": (
        lambda: simfx.transform(TinyResNet(), torch.randn(2, 4, 8, 8)), r"TinyResNet cannot run on the example inputs \(\(2, 4, 8, 8\).*at node 'stem'.*Pass example_inputs shaped like"),
    # tokens.py
    "tokens.py:sample_pair:ValueError#1": (_topk_without_input_at_runtime, r"token_sampling='topk_mean' ranks tokens by the block input.*choose 'shared' or 'per_sample'"),
    # trace.py
    "trace.py:register_leaf_module:TypeError#1": (lambda: simfx.register_leaf_module(3), r"register_leaf_module expects an nn\.Module subclass, got 3"),
    "trace.py:register_autowrap_function:TypeError#1": (lambda: simfx.register_autowrap_function(3), r"register_autowrap_function expects a function, got 3"),
    "trace.py:trace_model:TypeError#1": (lambda: simfx.transform("resnet", X), r"simfx expects a torch\.nn\.Module, got str"),
    "trace.py:trace_model:TypeError#2": (lambda: simfx.transform(TinyResNet(), X, leaf_modules=[3]), r"leaf_modules takes module classes or qualified names, got \[3\]"),
    "trace.py:trace_model:ValueError#1": (
        lambda: simfx.transform(TinyResNet(), X, leaf_modules=["block9"]), r"leaf_modules names \['block9'\] are not submodules of TinyResNet; use qualified names"),
    "trace.py:trace_model:TraceError#1": (_trace_with_many_opaque, r"simfx already made 1 modules opaque automatically \(a, \.\.\.\) and stopped; pass leaf_modules"),
    "trace.py:_bound_forward_class:TypeError#1": (lambda: simfx.transform(TinyResNet(), {"images": X}), r"example_inputs do not fit TinyResNet\.forward\(.*\): it has no parameter 'images'"),
    "trace.py:_bound_forward_class:TypeError#2": (lambda: simfx.transform(TinyResNet(), (X, X)), r"example_inputs do not fit TinyResNet\.forward\(.*Pass the forward's positional arguments as a tuple"),
    "trace.py:_run_tracer:_trace_error#1": (
        lambda: simfx.transform(TwoUntraceable(), torch.randn(2, 4), frontend="fx", auto_opaque=False), r"could not trace TwoUntraceable: inside module 'a' \(.*UntraceableChild\).*x\.sum\(\) > 0.*leaf_modules=\[UntraceableChild\]"),
}

# Raise sites with no message test, and why.
EXEMPT = {
    "__main__.py:<module>:SystemExit#1": "exits with the CLI's return code; tests/test_cli.py covers the CLI's messages",
    "cli.py:<module>:SystemExit#1": "exits with the CLI's return code; tests/test_cli.py covers the CLI's messages",
    "shapes.py:_ShapeRecorder.run_node:_NodeFailed#1": "internal: propagate_shapes turns it into the ExampleInputsError tested above",
}


def _attach_over_existing():
    class Owner(nn.Module):
        @compat.init_proj(8)
        def __init__(self):
            super().__init__()
            self.simfx = nn.Linear(8, 8)

    Owner()


def _raise_sites() -> dict[str, int]:
    """``file:function:Exception#n`` -> line, for every ``raise SomeError(...)`` in the package."""
    sites: dict[str, int] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        counts: collections.Counter = collections.Counter()
        scope: list[str] = []

        def visit(node):
            named = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if named:
                scope.append(node.name)
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                key = (".".join(scope) or "<module>", ast.unparse(node.exc.func))
                counts[key] += 1
                sites[f"{path.name}:{key[0]}:{key[1]}#{counts[key]}"] = node.lineno
            for child in ast.iter_child_nodes(node):
                visit(child)
            if named:
                scope.pop()

        visit(ast.parse(path.read_text()))
    return sites


def _innermost_simfx_frame(error: BaseException) -> tuple[str, str]:
    frames = [f for f in traceback.extract_tb(error.__traceback__) if pathlib.Path(f.filename).parent == PACKAGE]
    assert frames, f"{type(error).__name__} was not raised inside simfx: {error}"
    return pathlib.Path(frames[-1].filename).name, frames[-1].name


@pytest.mark.parametrize("site", sorted(MESSAGES))
def test_message(site, request):
    trigger, pattern = MESSAGES[site]
    fixtures = trigger.__code__.co_varnames[: trigger.__code__.co_argcount]
    with pytest.raises(Exception) as caught:
        trigger(*(request.getfixturevalue(name) for name in fixtures))
    filename, function = site.split(":")[:2]
    assert _innermost_simfx_frame(caught.value) == (filename, function.split(".")[-1]), (
        f"the trigger for {site} raised from elsewhere: {caught.value!r}"
    )
    assert re.search(pattern, str(caught.value), re.S), f"{site}: message does not match {pattern!r}:\n{caught.value}"


def test_every_raise_site_has_a_message_test():
    sites = _raise_sites()
    missing = [f"  {site}  (simfx/{site.split(':')[0]} line {line})"
               for site, line in sites.items() if site not in MESSAGES and site not in EXEMPT]
    stale = [f"  {site}" for site in (*MESSAGES, *EXEMPT) if site not in sites]
    assert not missing, (
        "raise sites without a message test; add a row '<site>': (trigger, pattern) to MESSAGES in "
        "tests/test_messages.py (or a reason to EXEMPT):\n" + "\n".join(missing)
    )
    assert not stale, (
        "MESSAGES/EXEMPT rows whose raise site no longer exists (renamed, moved or renumbered: "
        "#n counts raises of one exception type within a function, in source order):\n" + "\n".join(stale)
    )
