"""The modules simfx emits: GraphModules with one graph per mode.

fx bakes ``self.training`` into a traced graph, so a model is traced in both
modes and the emitted :class:`DualGraphModule` keeps both: ``graph`` runs in
training, ``eval_graph`` in eval, and ``forward`` dispatches on ``self.training``
(``torch.compile`` guards on that flag: one compiled graph per mode).

**Shared modules, on purpose.** The emitted module holds the user's own
submodules (the real ``layer1``, ``layer1[0]``, ...), not copies: no extra memory,
training it trains the user's model in place, and ``state_dict()`` keeps the
original names. The flip side: ``sim.train()``/``sim.eval()`` also switch the
user's submodules, and moving ``sim`` to a device moves them. Pass
``transform(..., copy=True)`` to work on a deep copy instead.
"""

from __future__ import annotations

import copy
import functools
import linecache
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = ["DualGraphModule", "SimGraphModule"]


def _compile_forward(graph: fx.Graph, tag: str):
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    key = f"<simfx {tag} {id(graph):x}>"
    linecache.cache[key] = (len(code.src), None, code.src.splitlines(True), key)
    exec(compile(code.src, key, "exec"), namespace)
    return namespace["forward"], code.src


def _base_class(cls: type) -> type:
    """The class behind fx's per-instance ``GraphModuleImpl`` subclass."""
    for klass in cls.__mro__:
        if klass.__qualname__.split(".")[-1] != "GraphModuleImpl":
            return klass
    return cls


def _rebuild(cls: type) -> "DualGraphModule":
    return cls.__new__(cls)


class DualGraphModule(fx.GraphModule):
    """A GraphModule that runs ``graph`` in training and ``eval_graph`` in eval mode.

    ``root`` provides the module tree: its children, parameters and buffers become
    this module's own (shared, not copied), so every name in ``state_dict()`` stays
    what it was on ``root``.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, eval_graph: fx.Graph, class_name: str | None = None):
        super().__init__(root, graph, class_name or _base_class(type(self)).__name__)
        # fx copied only the attributes the graph references, into fresh container
        # modules; adopt the real tree instead so names, hooks and unused modules survive.
        self._modules = dict(root._modules)
        self._parameters = dict(root._parameters)
        self._buffers = dict(root._buffers)
        self._non_persistent_buffers_set = set(root._non_persistent_buffers_set)
        self.training = root.training
        self._eval_graph = eval_graph
        self.recompile()

    @property
    def eval_graph(self) -> fx.Graph:
        """The graph run in eval mode (the original computation)."""
        return self._eval_graph

    @property
    def eval_code(self) -> str:
        """Python source generated from :attr:`eval_graph`."""
        return self._eval_code

    def recompile(self):
        result = super().recompile()
        cls = type(self)
        train_forward = cls.forward
        eval_graph = self.__dict__.get("_eval_graph")
        if eval_graph is None:
            eval_forward, self._eval_code = train_forward, self._code
        else:
            eval_forward, self._eval_code = _compile_forward(eval_graph, "eval")
        cls._simfx_train_forward = train_forward
        cls._simfx_eval_forward = eval_forward

        @functools.wraps(train_forward)
        def forward(self, *args, **kwargs):
            if self.training:
                return self._simfx_train_forward(*args, **kwargs)
            return self._simfx_eval_forward(*args, **kwargs)

        cls.forward = forward
        return result

    # fx's own pickling and deepcopy rebuild a plain GraphModule from the train
    # code alone; keep the class, both graphs and the full module tree instead.
    def __reduce__(self):
        return (_rebuild, (_base_class(type(self)),), self.__getstate__())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for generated in ("_code", "_eval_code", "_lineno_map", "_prologue_start"):
            state.pop(generated, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        graph = state.pop("_graph")
        self.__dict__.update(state)
        type(self).__name__ = _base_class(type(self)).__name__  # fx names the class in __init__
        self.graph = graph  # the setter recompiles both forwards

    def __deepcopy__(self, memo):
        new = _rebuild(_base_class(type(self)))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def __copy__(self):
        new = _rebuild(_base_class(type(self)))
        new.__setstate__(self.__getstate__())
        return new


class SimGraphModule(DualGraphModule):
    """What :func:`simfx.transform` returns.

    In training, ``forward`` returns ``(output, sim_loss)`` (plus a dict of per-block
    losses with ``per_block=True``); in eval mode it runs the original computation
    and returns a zero loss. ``simfx_info`` holds the plan as plain data: the
    chosen blocks with their options, and every candidate with the decision made
    about it. Reconstructors live under the ``simfx`` submodule.
    """

    simfx_info: Any

    @property
    def sim_blocks(self):
        """The planned blocks (boundary, options, submodule key), in graph order."""
        return self.simfx_info.plan.blocks
