"""The module simfx emits: a GraphModule that trains with SIM and evaluates as the model itself.

* **Training** runs the rewritten graph: the model's computation, with every
  selected block that is a whole module call still a call of that module (its
  hooks, checkpointing, grad-mode and autocast regions, train/eval flags and
  in-place code run as in eager PyTorch), plus the reconstructors. It returns
  ``(output, sim_loss)``.
* **Or the model trains itself.** For a model captured with torch.export the
  exported graph is only analysed: training calls the model's own forward, as
  the user calls it, and SIM reads the chosen blocks at their module calls
  (:mod:`simfx.runtime.taps`). Every input shape, keyword and Python behaviour
  of the model is then its own.
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
import inspect
import linecache
from collections.abc import MutableMapping
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import FaithfulnessError
from ..capture.inputs import CallTemplate
from ..capture.module_facts import has_hooks
from . import monitor
from .taps import TapSpec, install_taps, remove_taps_when_collected, training_step

__all__ = ["SimGraphModule", "NAMESPACE", "MODEL_ATTRIBUTES", "strip", "original_state_dict", "model_accepts_loss_kwargs"]

_MODEL = "_simfx_model"
NAMESPACE = "simfx"
"""The submodule holding the reconstructors: their ``state_dict`` keys start with ``simfx.``."""


MODEL_ATTRIBUTES = frozenset({
    "config", "generation_config", "main_input_name", "name_or_path",
    "gradient_checkpointing_enable", "gradient_checkpointing_disable", "activation_checkpointing_enable",
    "activation_checkpointing_disable", "is_gradient_checkpointing", "is_activation_checkpointing",
    "supports_gradient_checkpointing",
    "enable_input_require_grads", "disable_input_require_grads", "get_input_embeddings", "get_output_embeddings",
})
"""Attributes of the user's model the transformed module answers with, for the training stacks that read them
(Hugging Face's ``Trainer`` switches gradient checkpointing on through ``gradient_checkpointing_enable``)."""


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
        runtime: str = "graph",
        taps: Sequence[TapSpec] = (),
        weights: Sequence[float] = (),
    ):
        # The dispatching forward needs the call template while fx compiles the graph;
        # the model comes after nn.Module.__init__, whose `training = True` must not
        # reach the user's model.
        self.__dict__["_simfx_call"] = call
        self.__dict__["_simfx_eval_call"] = eval_call or call
        self.__dict__["_simfx_block_names"] = tuple(block_names)
        self.__dict__["_simfx_per_block"] = per_block
        self.__dict__["_simfx_loss_in_output"] = loss_in_output
        self.__dict__["_simfx_runtime"] = runtime
        self.__dict__["_simfx_weights"] = tuple(weights)
        super().__init__(holder, graph, "SimGraphModule")
        self.__dict__[_MODEL] = model
        if runtime == "model":
            owner, installed = install_taps(model, taps)
            self.__dict__["_simfx_tap_owner"], self.__dict__["_simfx_taps"] = owner, installed
            remove_taps_when_collected(self, model, installed)
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

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get(_MODEL)
            if name in MODEL_ATTRIBUTES and model is not None:
                return getattr(model, name)
            raise

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
        if self.__dict__.get("_simfx_runtime") == "model":
            source = (
                "def forward(self, *args, **kwargs):\n"
                "    if self.training:\n"
                "        return self._simfx_train_model(args, kwargs)\n"
                "    return self._simfx_eval_model(args, kwargs)\n"
            )
        else:
            source = (
                "def forward(self, *args, **kwargs):\n"
                "    inputs = self._simfx_graph_inputs(args, kwargs)\n"
                "    if self.training:\n"
                "        return self._simfx_train_step(inputs if inputs is not None else self._simfx_refuse(args, kwargs))\n"
                "    if inputs is None:\n"
                "        return self._simfx_eval_model(args, kwargs)\n"
                "    return self._simfx_eval_step(inputs)\n"
            )
        key = f"<simfx dispatch {id(self):x}>"
        linecache.cache[key] = (len(source), None, source.splitlines(True), key)
        namespace: dict[str, Any] = {}
        exec(compile(source, key, "exec"), namespace)
        forward = namespace["forward"]
        forward.__signature__ = self._simfx_signature()
        cls.forward = forward
        return result

    def _simfx_signature(self) -> inspect.Signature:
        """What ``inspect.signature(sim)`` shows (training stacks read it to pick a batch's columns).

        The model runtime takes the model's own call; the training graph, the example's inputs.
        """
        model = self.__dict__.get(_MODEL)
        if self.__dict__.get("_simfx_runtime") == "model" and model is not None:
            try:
                return inspect.signature(type(model).forward)
            except (TypeError, ValueError):
                pass
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        return inspect.Signature([inspect.Parameter(n, kind) for n in ("self", *self._simfx_call.names)])

    def _simfx_graph_inputs(self, args: tuple, kwargs: dict) -> tuple | None:
        """The training graph's inputs from a call: by its input names, or as the model is called; None if neither."""
        names = self._simfx_call.names
        if not kwargs and len(args) == len(names):
            return args
        if len(args) + len(kwargs) == len(names) and all(k in names[len(args):] for k in kwargs):
            return (*args, *(kwargs[n] for n in names[len(args):]))
        return self._simfx_call.inputs_of(args, kwargs)

    def _simfx_refuse(self, args: tuple, kwargs: dict):
        """The error for a training call the training graph cannot take."""
        template = self._simfx_call
        expected = [f"{k}=" for k, _ in template.keywords]
        unknown = [k for k in kwargs if k not in template.names and k not in dict(template.keywords)]
        what = (f"keyword argument {unknown[0]!r}, which the example did not pass" if unknown
                else f"{len(args)} positional and {len(kwargs)} keyword arguments")
        raise TypeError(
            f"{type(self.__dict__[_MODEL]).__name__}'s training graph was traced with the example's call "
            f"({len(template.positional)} positional argument(s){', ' + ', '.join(expected) if expected else ''}; "
            f"graph inputs: {', '.join(template.names)}), and this call has {what}. Transform with an example that "
            f"passes what training passes (eval mode calls the model as you call it, with any arguments)."
        )

    def _simfx_train_step(self, inputs: tuple):
        self._simfx_check_traced_modules()
        model = self.__dict__[_MODEL]
        if has_hooks(model) or _global_hooks():
            outputs = _with_root_hooks(self, model, inputs)
        else:
            outputs = self._simfx_train_graph_forward(*inputs)
        return _loss_into_output(model, outputs) if self._simfx_loss_in_output else outputs

    def _simfx_eval_step(self, inputs: tuple):
        args, kwargs = self._simfx_eval_call.model_call(inputs)
        return self._simfx_eval_model(args, kwargs, inputs)

    def _simfx_eval_model(self, args: tuple, kwargs: dict, inputs: tuple | None = None):
        output = self.__dict__[_MODEL](*args, **kwargs)
        if self._simfx_loss_in_output:
            return output
        zero = _zero_like_first_tensor(inputs if inputs is not None else (*args, *kwargs.values()))
        if self._simfx_per_block:
            return output, zero, {name: zero for name in self._simfx_block_names}
        return output, zero

    def _simfx_block_losses(self, args: tuple, kwargs: dict) -> tuple[Any, list]:
        """The model's own call with the taps reading: its output, and each block's loss (None: not run)."""
        model = self.__dict__[_MODEL]
        heads = self._modules[NAMESPACE]
        return training_step(
            self.__dict__["_simfx_tap_owner"], [heads[key] for key in heads], self._simfx_block_names,
            lambda: model(*args, **kwargs),
        )

    def _simfx_train_model(self, args: tuple, kwargs: dict):
        """A training step of the model runtime: the model's own call, with the taps reading the blocks."""
        model = self.__dict__[_MODEL]
        names = self._simfx_block_names
        output, losses = self._simfx_block_losses(args, kwargs)
        ran = [i for i, loss in enumerate(losses) if loss is not None]
        if ran:
            sim_loss = monitor.aggregate_losses(
                tuple(losses[i] for i in ran), tuple(self._simfx_weights[i] for i in ran), tuple(names[i] for i in ran),
            )
        else:
            sim_loss = _zero_like_first_tensor((*args, *kwargs.values()))
        outputs = (output, sim_loss, {names[i]: losses[i] for i in ran}) if self._simfx_per_block else (output, sim_loss)
        return _loss_into_output(model, outputs) if self._simfx_loss_in_output else outputs

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
        taps = self.__dict__.get("_simfx_taps")
        if taps:
            remove_taps_when_collected(self, self.__dict__[_MODEL], taps)

    def __deepcopy__(self, memo):
        new = _rebuild(_base_class(type(self)))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def __copy__(self):
        new = _rebuild(_base_class(type(self)))
        new.__setstate__(self.__getstate__())  # shares the model and its taps with this module
        return new

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether ``transformers.Trainer`` may pass ``num_items_in_batch``, as it does to the model.

        Hugging Face models take it through ``**kwargs`` and divide their summed loss by
        it (so the Trainer leaves gradient accumulation's scaling to them). A model that
        trains itself takes it as the model does. A training graph takes exactly the
        inputs of the example it was captured with, so it takes ``num_items_in_batch``
        only when the example held it:
        ``simfx.transform(model, {**batch, "num_items_in_batch": torch.tensor(n)}, loss_in_output=True)``.
        """
        if self.__dict__.get("_simfx_runtime") == "model":
            return model_accepts_loss_kwargs(self.__dict__[_MODEL])
        return "num_items_in_batch" in self._simfx_call.names

    @property
    def sim_blocks(self):
        """The planned blocks (boundary, options, submodule key), in graph order."""
        return self.simfx_info.plan.blocks


def model_accepts_loss_kwargs(model: nn.Module) -> bool:
    """Whether ``transformers.Trainer`` passes ``num_items_in_batch`` to ``model`` (its flag, else a ``**kwargs``)."""
    takes = getattr(model, "accepts_loss_kwargs", None)
    if takes is not None:
        return bool(takes)
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


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
    for value in pytree.tree_leaves(inputs):
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
