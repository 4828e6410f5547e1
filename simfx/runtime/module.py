"""The module simfx emits: a GraphModule that trains with SIM and evaluates as the model itself.

* **Training** runs the rewritten graph: the model's computation, with every
  selected block that is a whole module call still a call of that module (its
  hooks, checkpointing, grad-mode and autocast regions, train/eval flags and
  in-place code run as in eager PyTorch), plus the reconstructors. It returns
  ``(output, sim_loss)``.
* **Eval** calls the user's model itself, with the same arguments, and returns
  ``(model(...), 0)``: bit-exact by construction, hooks and all.
* **One mode flag.** ``sim.training`` *is* the model's ``training`` flag:
  ``sim.train()``/``sim.eval()`` call the model's own ``train()`` (a subclass
  override that freezes BatchNorm still runs), and ``model.eval()`` on the
  user's object switches ``sim`` too.

**Shared modules, on purpose.** The emitted module holds the user's own
submodules (the real ``layer1``, ``layer1[0]``, ...), not copies: no extra memory,
training it trains the user's model in place, and ``state_dict()`` keeps the
original names. Moving ``sim`` to a device moves them. Pass
``transform(..., copy=True)`` to work on a deep copy instead.

What the training graph cannot see at run time is checked when it runs:
modules whose code was traced through (not called) must not have gained hooks
since the transform, and modules whose traced code read ``self.training`` must
still be in training mode; otherwise a :class:`~simfx.FaithfulnessError` says
which module and what to do.
"""

from __future__ import annotations

import copy
import linecache
from collections.abc import MutableMapping
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..errors import FaithfulnessError, InputShapeError
from ..capture.inputs import CallTemplate
from ..capture.module_facts import has_hooks

__all__ = ["SimGraphModule", "NAMESPACE", "strip", "original_state_dict"]

_MODEL = "_simfx_model"
NAMESPACE = "simfx"
"""The submodule holding the reconstructors: their ``state_dict`` keys start with ``simfx.``."""


def _base_class(cls: type) -> type:
    """The class behind fx's per-instance ``GraphModuleImpl`` subclass."""
    for klass in cls.__mro__:
        if klass.__qualname__.split(".")[-1] != "GraphModuleImpl":
            return klass
    return cls


def _rebuild(cls: type) -> "SimGraphModule":
    return cls.__new__(cls)


class SimGraphModule(fx.GraphModule):
    """What :func:`simfx.transform` returns.

    In training, ``forward`` returns ``(output, sim_loss)`` (plus a dict of per-block
    losses with ``per_block=True``); in eval mode it calls the model and returns a
    zero loss. ``graph``/``code`` are the training graph with the inserted
    ``simfx.<block>`` nodes. ``simfx_info`` holds the plan as plain data: the chosen
    blocks with their options, and every candidate with the decision made about it.
    Reconstructors live under the ``simfx`` submodule.
    """

    simfx_info: Any

    def __init__(
        self,
        holder: nn.Module,
        graph: fx.Graph,
        *,
        model: nn.Module,
        call: CallTemplate,
        eval_call: CallTemplate | None = None,
        traced_modules: Sequence[tuple[str, nn.Module]] = (),
        flag_readers: Sequence[tuple[str, nn.Module, str, bool]] = (),
        block_names: Sequence[str] = (),
        per_block: bool = False,
        loss_in_output: bool = False,
        fixed_sizes: Sequence[tuple[int | None, ...] | None] = (),
    ):
        # The dispatching forward needs the call template while fx compiles the graph;
        # the model comes after nn.Module.__init__, whose `training = True` must not
        # reach the user's model.
        self.__dict__["_simfx_call"] = call
        self.__dict__["_simfx_eval_call"] = eval_call or call
        self.__dict__["_simfx_block_names"] = tuple(block_names)
        self.__dict__["_simfx_per_block"] = per_block
        self.__dict__["_simfx_loss_in_output"] = loss_in_output
        self.__dict__["_simfx_fixed_sizes"] = tuple(fixed_sizes)
        super().__init__(holder, graph, "SimGraphModule")
        self.__dict__[_MODEL] = model
        # fx copied only the attributes the graph references, into fresh container
        # modules; adopt the real tree instead so names, hooks and unused modules survive.
        self._modules = dict(holder._modules)
        self._parameters = dict(holder._parameters)
        self._buffers = dict(holder._buffers)
        self._non_persistent_buffers_set = set(holder._non_persistent_buffers_set)
        self._simfx_traced = tuple(traced_modules)
        self._simfx_flag_readers = tuple(flag_readers)

    # --- the mode flag is the model's -------------------------------------------

    @property
    def training(self) -> bool:  # type: ignore[override]
        model = self.__dict__.get(_MODEL)
        return model.training if model is not None else self.__dict__.get("training", True)

    @training.setter
    def training(self, mode: bool) -> None:
        model = self.__dict__.get(_MODEL)
        if model is not None:
            model.training = mode
        else:
            self.__dict__["training"] = mode

    def train(self, mode: bool = True) -> "SimGraphModule":
        """Switch the model (through its own ``train``) and the reconstructors."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.__dict__[_MODEL].train(mode)
        for name, module in self._modules.items():
            if module is not None and name not in self.__dict__[_MODEL]._modules:
                module.train(mode)
        return self

    def simfx_model(self) -> nn.Module:
        """The user's model: what eval mode runs and :func:`simfx.strip` returns.

        (A method, not an attribute named ``model``: that name is often a submodule
        of the user's own, Ultralytics' ``DetectionModel.model`` for one.)
        """
        return self.__dict__[_MODEL]

    # --- forward ------------------------------------------------------------------

    def recompile(self):
        result = super().recompile()
        cls = type(self)
        cls._simfx_train_graph_forward = cls.forward
        names = self._simfx_call.names
        signature = ", ".join(names)
        packed = f"({signature},)" if len(names) == 1 else f"({signature})"
        source = (
            f"def forward(self, {signature}):\n"
            f"    if self.training:\n"
            f"        return self._simfx_train_step({packed})\n"
            f"    return self._simfx_eval_step({packed})\n"
        )
        key = f"<simfx dispatch {id(self):x}>"
        linecache.cache[key] = (len(source), None, source.splitlines(True), key)
        namespace: dict[str, Any] = {}
        exec(compile(source, key, "exec"), namespace)
        cls.forward = namespace["forward"]
        return result

    def _simfx_train_step(self, inputs: tuple):
        self._simfx_check_traced_modules()
        if self.__dict__.get("_simfx_fixed_sizes"):
            self._simfx_check_sizes(inputs)
        model = self.__dict__[_MODEL]
        if has_hooks(model) or _global_hooks():
            outputs = _with_root_hooks(self, model, inputs)
        else:
            outputs = self._simfx_train_graph_forward(*inputs)
        return _loss_into_output(model, outputs) if self._simfx_loss_in_output else outputs

    def _simfx_eval_step(self, inputs: tuple):
        args, kwargs = self._simfx_eval_call.model_call(inputs)
        output = self.__dict__[_MODEL](*args, **kwargs)
        if self._simfx_loss_in_output:
            return output
        zero = _zero_like_first_tensor(inputs)
        if self._simfx_per_block:
            return output, zero, {name: zero for name in self._simfx_block_names}
        return output, zero

    def _simfx_check_traced_modules(self) -> None:
        for name, module in self._simfx_traced:
            if has_hooks(module):
                raise FaithfulnessError(
                    f"module '{name}' has hooks, registered after simfx.transform: simfx traced its code "
                    f"into the training graph, so they would not run. Register them before transforming "
                    f"(simfx then keeps '{name}' as one call, so they run), or pass "
                    f"leaf_modules=['{name}'] to transform."
                )
        for name, module, where, traced_mode in self._simfx_flag_readers:
            if module.training != traced_mode:
                now, then = ("eval", "training") if traced_mode else ("training", "eval")
                raise FaithfulnessError(
                    f"module '{name}' is in {now} mode, but traced code read its self.training as in {then} "
                    f"mode{f' ({where})' if where else ''} and the training graph keeps that branch. Pass "
                    f"leaf_modules=['{name}'] to transform so it runs as one call and follows its own mode, or "
                    f"call sim.train() before training."
                )

    def _simfx_check_sizes(self, inputs: tuple) -> None:
        for name, value, sizes in zip(self._simfx_call.names, inputs, self._simfx_fixed_sizes):
            if sizes is None or not isinstance(value, torch.Tensor):
                continue
            shape = tuple(value.shape)
            if len(shape) == len(sizes) and all(s is None or s == n for s, n in zip(sizes, shape)):
                continue
            wanted = "x".join("B" if s is None else str(s) for s in sizes)
            raise InputShapeError(
                f"input '{name}' has shape {'x'.join(map(str, shape))}, but the training graph was captured by "
                f"torch.export for {wanted} (B: any batch size): export fixes every other axis to the example's. "
                f"Transform with an example of the shape you train with (pad to a fixed length, e.g. "
                f"padding='max_length'), or one module per shape; frontend='fx' keeps sizes free where fx can "
                f"trace the model."
            )

    # --- copying and pickling -----------------------------------------------------
    # fx's own pickling and deepcopy rebuild a plain GraphModule from the code alone;
    # keep the class, the model and the full module tree instead.

    def __reduce__(self):
        return (_rebuild, (_base_class(type(self)),), self.__getstate__())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for generated in ("_code", "_lineno_map", "_prologue_start"):
            state.pop(generated, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        graph = state.pop("_graph")
        self.__dict__.update(state)
        type(self).__name__ = _base_class(type(self)).__name__  # fx names the class in __init__
        self.graph = graph  # the setter recompiles the forward

    def __deepcopy__(self, memo):
        new = _rebuild(_base_class(type(self)))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def __copy__(self):
        new = _rebuild(_base_class(type(self)))
        new.__setstate__(self.__getstate__())
        return new

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether ``transformers.Trainer`` may pass ``num_items_in_batch``: when the example had it.

        Hugging Face models take it through ``**kwargs`` and divide their summed loss by
        it (so the Trainer leaves gradient accumulation's scaling to them). The training
        graph takes exactly the inputs of the example it was captured with, so it takes
        ``num_items_in_batch`` only when the example held it:
        ``simfx.transform(model, {**batch, "num_items_in_batch": torch.tensor(n)}, loss_in_output=True)``.
        """
        return "num_items_in_batch" in self._simfx_call.names

    @property
    def sim_blocks(self):
        """The planned blocks (boundary, options, submodule key), in graph order."""
        return self.simfx_info.plan.blocks


def _loss_into_output(model: nn.Module, outputs: tuple):
    """The model's output with ``sim_loss`` (and ``sim_losses``) in it, and in its ``loss`` when it has one."""
    output, sim_loss = outputs[0], outputs[1]
    if not isinstance(output, MutableMapping):
        raise TypeError(
            f"transform(..., loss_in_output=True) needs a model returning a dict or a ModelOutput; "
            f"{type(model).__name__} returned {type(output).__name__}. Use the default (output, sim_loss) tuple."
        )
    task_loss = output.get("loss")
    output["sim_loss"] = sim_loss
    if len(outputs) > 2:
        output["sim_losses"] = outputs[2]
    if task_loss is not None:
        output["loss"] = task_loss + sim_loss
    return output


def _zero_like_first_tensor(inputs: tuple) -> torch.Tensor:
    for value in inputs:
        if isinstance(value, torch.Tensor):
            return value.new_zeros((), dtype=torch.float32)
    return torch.zeros((), dtype=torch.float32)


def _global_hooks() -> bool:
    module = torch.nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


def _with_root_hooks(sim: SimGraphModule, model: nn.Module, inputs: tuple):
    """The training graph wrapped in the model's own forward hooks, as ``model(...)`` would run them.

    Pre-hooks see and may replace the model's arguments; forward hooks see and may
    replace its output (not the SIM loss). Backward hooks on the model itself
    cannot wrap a graph that also returns the loss, and are refused.
    """
    if model._backward_hooks or getattr(model, "_backward_pre_hooks", None):
        raise FaithfulnessError(
            f"{type(model).__name__} has backward hooks on the model itself; simfx cannot run them around its "
            f"training graph. Register them on a submodule, or on the transformed module."
        )
    module = torch.nn.modules.module
    args, kwargs = sim._simfx_call.model_call(inputs)
    for hook_id, hook in (*module._global_forward_pre_hooks.items(), *model._forward_pre_hooks.items()):
        if hook_id in model._forward_pre_hooks_with_kwargs:
            result = hook(model, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(
                        f"forward pre-hook must return None or a tuple of (new_args, new_kwargs), but got {result}."
                    )
                args, kwargs = result
        else:
            result = hook(model, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    inputs_now = sim._simfx_call.inputs_of(tuple(args), kwargs)
    if inputs_now is None:
        raise FaithfulnessError(
            f"a forward pre-hook of {type(model).__name__} changed the model's non-tensor arguments or their "
            f"number; simfx's training graph was traced with the example's. Transform with example inputs "
            f"shaped like what the hook passes on."
        )
    outputs = sim._simfx_train_graph_forward(*inputs_now)
    output = outputs[0]
    for hook_id, hook in (*module._global_forward_hooks.items(), *model._forward_hooks.items()):
        if hook_id in model._forward_hooks_with_kwargs:
            result = hook(model, args, kwargs, output)
        else:
            result = hook(model, args, output)
        if result is not None:
            output = result
    return (output, *outputs[1:])


def strip(sim: nn.Module) -> nn.Module:
    """The model without SIM: the user's model itself (the copy, with ``transform(copy=True)``).

    Its parameters are the ones ``sim`` trained, its forward is its own, and its
    ``state_dict()`` loads into the original architecture with ``strict=True``.

    >>> import torch, torchvision, simfx
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> sim = simfx.transform(model, torch.randn(2, 3, 64, 64))
    >>> simfx.strip(sim) is model
    True
    """
    if not isinstance(sim, SimGraphModule):
        raise TypeError(
            f"simfx.strip expects a module returned by simfx.transform, got {type(sim).__name__}."
        )
    return sim.simfx_model()


# Prefixes torch.compile (OptimizedModule) and DistributedDataParallel put before every key.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def original_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The original model's entries of a transformed module's ``state_dict`` (reconstructors dropped).

    Wrapper prefixes are removed first: ``_orig_mod.`` (a ``torch.compile``-d
    module's ``state_dict``) and ``module.`` (DDP's), in any nesting, when every
    key carries them, so a checkpoint of ``DDP(torch.compile(sim))`` loads into
    the plain original model with ``strict=True``.

    >>> sd = {"conv.weight": 1, "simfx.layer1_0.objective.predictor.weight": 2}
    >>> original_state_dict(sd)
    {'conv.weight': 1}
    >>> original_state_dict({"module._orig_mod.conv.weight": 1, "module._orig_mod.simfx.a.weight": 2})
    {'conv.weight': 1}
    """
    state_dict = dict(state_dict)
    while state_dict:
        wrapper = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if wrapper is None:
            break
        state_dict = {k[len(wrapper):]: v for k, v in state_dict.items()}
    prefix = f"{NAMESPACE}."
    return {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
