"""Where an activation keeps its channels: every layout rule simfx has, in one place.

* Weight layers fix the channel axis (:func:`weight_layer_layout`, :func:`module_layout`):
  convolutions and batch/group/instance norms read channels first (axis 1),
  linear layers, layer/RMS norms, embeddings and attention read them last.
* Layout ops move it (:func:`axis_after`, :func:`axis_before`): ``permute``,
  ``transpose``, ``movedim``; reshapes keep it when it survives as the last axis
  or as axis 1 of the same size.
* Without a weight layer to go by, ``(B, N, C)`` is channels last and ``(B, C)``,
  ``(B, C, H, W)``, ... channels first (:func:`default_channel_dim`).
* A channel axis is any axis but the batch axis 0 (:func:`is_channel_axis`).

The shape pass (forwards through the graph), the boundaries stage (backwards
from a block's first weight layer to its input), the plan (``channel_dim``
overrides) and the SIM-pytorch compatibility layer (at run time) all use these.
"""

from __future__ import annotations

import enum
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = [
    "declared_batch_axis", "Layout", "weight_layer_layout", "module_layout", "op_name", "axis_after", "axis_before", "UNKNOWN",
    "batch_axis", "default_channel_dim", "is_channel_axis", "is_layout_op", "layout_name", "token_count",
]


class Layout(enum.Enum):
    """Where a weight layer reads its channels."""

    CHANNELS_FIRST = "channels first"
    CHANNELS_LAST = "channels last"

    def axis(self, rank: int) -> int:
        """The channel axis of a tensor of ``rank`` dims in this layout."""
        return 1 if self is Layout.CHANNELS_FIRST else rank - 1


_FIRST_MODULES: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
_LAST_MODULES: tuple[type, ...] = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.Bilinear, nn.MultiheadAttention) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
_FIRST_FUNCTIONS = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.batch_norm, F.group_norm, F.instance_norm, torch.conv1d, torch.conv2d, torch.conv3d,
    torch.batch_norm, torch.group_norm,
}
_LAST_FUNCTIONS = {F.linear, F.layer_norm, torch.layer_norm, torch._C._nn.linear} | (
    {F.rms_norm} if hasattr(F, "rms_norm") else set()
)
# ATen operator names (export graphs), by overload packet.
_FIRST_ATEN = {
    "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
    "_native_batch_norm_legit_no_training", "group_norm", "native_group_norm", "instance_norm",
}
_LAST_ATEN = {"linear", "layer_norm", "native_layer_norm", "rms_norm", "embedding"}


def module_layout(module: nn.Module) -> Layout | None:
    """The layout a module reads its input in, if it is a weight layer simfx knows."""
    if isinstance(module, _FIRST_MODULES):
        return Layout.CHANNELS_FIRST
    if isinstance(module, _LAST_MODULES):
        return Layout.CHANNELS_LAST
    return None


def op_name(target) -> str | None:
    """``"permute"`` for ``aten.permute.default``, ``Tensor.permute`` or ``torch.permute``."""
    if isinstance(target, str):
        return target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", None)


def weight_layer_layout(node: fx.Node, root: nn.Module, *, element_zero: bool = False) -> Layout | None:
    """The layout a graph node reads its input in, if it applies a weight layer (fx or ATen level).

    With ``element_zero``, element 0 of a layer returning a tuple (ATen's native
    norms, attention) has that layer's layout too.
    """
    if node.op == "call_module":
        return module_layout(root.get_submodule(node.target))
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        source = node.args[0]
        if element_zero and node.args[1] == 0 and isinstance(source, fx.Node):
            return weight_layer_layout(source, root)
        return None
    if node.target in _FIRST_FUNCTIONS:
        return Layout.CHANNELS_FIRST
    if node.target in _LAST_FUNCTIONS:
        return Layout.CHANNELS_LAST
    if isinstance(node.target, torch._ops.OpOverload):
        name = op_name(node.target)
        if name in _FIRST_ATEN:
            return Layout.CHANNELS_FIRST
        if name in _LAST_ATEN:
            return Layout.CHANNELS_LAST
    return None


def _permutation(node: fx.Node, rank: int) -> list[int] | None:
    """Input axis of each output axis for permute/transpose/movedim/t; None for other ops or unknown dims."""
    name, rest = op_name(node.target), node.args[1:]
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        dims = node.kwargs.get("dims", dims)
        if len(dims) != rank or not all(isinstance(d, int) for d in dims):
            return None
        return [d % rank for d in dims]
    if name == "t":
        rest = (0, 1)
    if name not in ("transpose", "swapaxes", "swapdims", "t", "movedim"):
        return None
    if len(rest) < 2 or not all(isinstance(d, int) for d in rest[:2]):
        return None
    a, b = (d % rank for d in rest[:2])
    order = list(range(rank))
    if name == "movedim":
        order.insert(b, order.pop(a))
    else:
        order[a], order[b] = order[b], order[a]
    return order


UNKNOWN = object()
"""What :func:`axis_after` says of a node that is not a layout op (the caller decides)."""

_LAYOUT_OPS = ("permute", "transpose", "swapaxes", "swapdims", "t", "movedim")
_RESHAPES = ("flatten", "reshape", "view", "_unsafe_view", "contiguous", "unflatten", "squeeze", "unsqueeze")


def axis_after(node: fx.Node, axis: int, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
    """The channel axis of ``node``'s output given its input's; None if lost; :data:`UNKNOWN` if no layout op."""
    name = op_name(node.target)
    if node.op not in ("call_method", "call_function") or name is None:
        return UNKNOWN
    if name in _LAYOUT_OPS:
        order = _permutation(node, len(in_shape))
        return order.index(axis) if order is not None and axis in order else None
    if name in _RESHAPES:
        # Keep the axis when it survives as "the last one" or as "axis 1" with the
        # same size; anything else is a genuine relayout we do not guess at.
        if axis == len(in_shape) - 1 and out_shape[-1] == in_shape[-1]:
            return len(out_shape) - 1
        if axis == 1 and len(out_shape) >= 2 and out_shape[1] == in_shape[1]:
            return 1
        return None
    return UNKNOWN


def axis_before(node: fx.Node, axis: int, rank: int) -> int | None:
    """The input axis a permute/transpose/movedim moves to output ``axis`` (None if its dims are not ints)."""
    order = _permutation(node, rank)
    return order[axis] if order is not None else None


def is_layout_op(node: fx.Node) -> bool:
    return op_name(node.target) in _LAYOUT_OPS


def default_channel_dim(rank: int) -> int:
    """(B, C) and conv maps keep channels at axis 1; (B, N, C) keeps them last."""
    return 2 if rank == 3 else 1


def is_channel_axis(axis: int, rank: int, batch_dim: int = 0) -> bool:
    """``axis`` (negative counts from the end) names a non-batch axis of a ``rank``-dim tensor."""
    return -rank <= axis < rank and axis % rank != batch_dim


def batch_axis(meta, batch: int | None) -> int | None:
    """Where a tensor (a ``TensorMeta``) keeps its batch: axis 0, or axis 1 of a sequence-first value
    (``(N, B, C)``, as ``nn.Transformer`` without ``batch_first`` and fairseq-style models keep it); else None.

    >>> from types import SimpleNamespace as Meta
    >>> batch_axis(Meta(shape=(2, 16, 32), rank=3), 2), batch_axis(Meta(shape=(16, 2, 32), rank=3), 2)
    (0, 1)
    """
    if batch is None or (meta.rank and meta.shape[0] == batch):
        return 0
    if meta.rank == 3 and meta.shape[1] == batch:
        return 1
    return None


def declared_batch_axis(module) -> int | None:
    """The batch axis of a block's ``(N, B, C)``/``(B, N, C)`` values that torch.nn's own layers declare.

    ``nn.MultiheadAttention`` and the ``nn.Transformer*Layer``s take sequence-first
    values unless built with ``batch_first=True``: a block made of them reads its
    batch at axis 1 whatever the model's input looks like. None when no such layer says.
    """
    declared = {
        m.batch_first for m in module.modules()
        if isinstance(m, _SEQUENCE_LAYERS) and isinstance(getattr(m, "batch_first", None), bool)
    }
    return (0 if declared.pop() else 1) if len(declared) == 1 else None


def layout_name(meta, channel_dim: int | None, batch_dim: int = 0) -> str:
    """``NCHW``, ``BNC``, ``NBC``, ``BC``, ... of a tensor (a ``TensorMeta``) with its channels at ``channel_dim``."""
    if meta is None or channel_dim is None:
        return "?"
    rank = meta.rank
    if rank == 2:
        return "BC"
    if batch_dim == 1:
        return {3: {2: "NBC"}}.get(rank, {}).get(channel_dim, f"rank{rank}/B@1/C@{channel_dim}")
    named = {3: {2: "BNC", 1: "BCN"}, 4: {1: "NCHW", 3: "NHWC"}, 5: {1: "NCDHW", 4: "NDHWC"}}
    return named.get(rank, {}).get(channel_dim, f"rank{rank}/C@{channel_dim}")


def token_count(meta, channel_dim: int | None, batch_dim: int = 0) -> int | None:
    """Tokens per sample once the value is read as ``(B, N, C)``; a ``(B, C)`` value is B tokens."""
    if meta is None or channel_dim is None:
        return None
    if meta.rank == 2:
        return meta.shape[0]
    return math.prod(s for i, s in enumerate(meta.shape) if i not in (batch_dim, channel_dim))


_SEQUENCE_LAYERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
