"""The eager fast path of the default objective: rho_sim with ``norm_mse`` as one autograd node.

What it computes is exactly :class:`~simfx.runtime.objectives.RhoSim` with the finite
check of :class:`~simfx.runtime.heads.BoundaryObjective` around it (DESIGN.md steps
5-6): target ``proj(x)`` without gradient, prediction ``predictor(proj(pre_proj(y)))``,
``norm_mse`` in float32, and NaN (computed on zeros, so no NaN gradient) when the
sampled activations are not finite. ``tests/test_fast_paths.py`` checks it against
that reference, value and gradient.

Why it is cheaper in eager mode, with the same arithmetic:

* the target and prediction rows go through the shared projector together
  (``[pre_proj(y); x]``, one matrix product per layer instead of two), and the
  backward uses only the prediction rows, as autograd would;
* the backward is written out (matrix products, bias sums, ReLU masks and
  :func:`~simfx.runtime.losses.norm_mse_backward`), so autograd records one node per
  block instead of about forty, with none of their views, transposes and
  bookkeeping; about a third of the aten calls of the plain expression remain;
* the gradients are computed in the forward, for a unit upstream gradient, and
  the backward only scales them: the block's activations are freed right away,
  and what waits for the backward is gradient-sized (the reconstructor's
  parameters and the sampled tokens), less than the activations autograd would
  keep. Gradients are linear in the upstream gradient, so scaling is exact up to
  one float rounding;
* with many sampled tokens the prediction goes through ``Wp W3`` multiplied once
  per step rather than through ``W3`` and then ``Wp`` token by token (the same map;
  about a tenth fewer FLOPs on resnet18's first stage).

It runs only where it computes what the reference would: no autocast (its casts
and cast cache are autograd's business), activations in the reconstructor's dtype,
at least two sampled tokens, the module structure ``RhoSim`` builds, and no hooks
on it or forward replaced on the instance. Elsewhere :func:`rho_sim_norm_mse`
returns ``None`` and the caller runs the reference. Under ``torch.compile`` on a
CPU the whole block, its token sampling included, is one opaque operator
(:func:`rho_sim_block_loss`), or the loss alone where the block's layout does not
admit that (see the end of this file); on other devices the compiler gets the
reference expression, which it fuses.
"""

from __future__ import annotations

import inspect
from typing import List, Optional  # typing's forms: torch 2.5's schema inference knows only these

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from .losses import norm_mse_backward, norm_mse_forward_stacked
from .tokens import narrow_channels, put_tokens, sample_block_tokens, sample_count, to_tokens

__all__ = ["rho_sim_norm_mse", "rho_sim_block_loss", "compiled_on_cpu"]


def rho_sim_norm_mse(objective: nn.Module, x_tokens: Tensor, y_tokens: Tensor) -> Tensor | None:
    """The block's float32 loss by the fast path, or ``None`` where only the reference applies.

    ``objective`` is a :class:`~simfx.runtime.objectives.RhoSim`; ``x_tokens`` and
    ``y_tokens`` are the sampled ``(B, k, C_in)`` and ``(B, k, C_out)`` tokens, not yet
    checked for finiteness (non-finite ones give NaN, as in the reference).
    """
    if y_tokens.shape[1] < 2:
        return None  # one token: norm_mse's special case
    layers = _layers(objective, x_tokens, y_tokens)
    if layers is None:
        return None
    if torch.compiler.is_compiling():
        return torch.ops.simfx.rho_sim_norm_mse(y_tokens, x_tokens, *layers)[0]
    return _RhoSimNormMSE.apply(y_tokens, x_tokens, *layers)


def compiled_on_cpu(t: Tensor) -> bool:
    """Whether ``torch.compile`` is tracing a computation on CPU tensors like ``t``.

    There SIM's maths runs as opaque operators (the end of this file, and the aggregate in
    :mod:`~simfx.runtime.monitor`): inductor's C++ kernels for it cost a compiler run each
    in the first compiled step and ran no faster than the eager code. On a GPU the compiler
    gets the plain expressions, whose fused kernels beat dozens of separate launches.
    """
    return torch.compiler.is_compiling() and t.device.type == "cpu"


def _layers(objective: nn.Module, x_tokens: Tensor, y_tokens: Tensor) -> tuple | None:
    """``(pre_proj weight or None, w1, b1, w2, b2, w3, b3, wp, bp)`` if the fast path applies.

    ``x_tokens`` and ``y_tokens`` are the block's tokens or the activations they come
    from: only their dtypes and devices are read.
    """
    if objective.loss != "norm_mse":
        return None
    if torch.compiler.is_compiling() and not compiled_on_cpu(y_tokens):
        return None  # the compiler gets the reference expression (compiled_on_cpu says why)
    children = objective._modules  # plain dict reads: this runs for every block at every step
    pre, proj, predictor = children.get("pre_proj"), children.get("proj"), children.get("predictor")
    if type(proj) is not nn.Sequential or type(predictor) is not nn.Linear or type(pre) not in (nn.Linear, nn.Identity):
        return None
    layers = tuple(proj._modules.values())
    if [type(m) for m in layers] != _PROJECTOR:
        return None
    # A hook, or a forward replaced on the instance, must see its module run.
    if _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks or any(
        m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__
        for m in (objective, pre, proj, *layers, predictor)
    ):
        return None
    l1, l2, l3 = layers[0]._parameters, layers[2]._parameters, layers[4]._parameters
    head = predictor._parameters
    weight = head["weight"]
    device = y_tokens.device
    if (
        x_tokens.dtype != weight.dtype
        or y_tokens.dtype != weight.dtype
        or torch.is_autocast_enabled(device.type)
        or x_tokens.device != weight.device
        or device != weight.device
        or l1["bias"] is None or l2["bias"] is None or l3["bias"] is None or head["bias"] is None
    ):
        return None
    pre_weight = pre._parameters["weight"] if type(pre) is nn.Linear else None
    return (pre_weight, l1["weight"], l1["bias"], l2["weight"], l2["bias"], l3["weight"], l3["bias"], weight,
            head["bias"])


_PROJECTOR = [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]


class _RhoSimNormMSE(torch.autograd.Function):
    """rho_sim + norm_mse + the finite check as one node; see :func:`_loss_and_unit_gradients`."""

    @staticmethod
    def forward(ctx, y_tokens, x_tokens, *layers):
        wanted = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:])
        loss, finite, units = _loss_and_unit_gradients(y_tokens, x_tokens, layers, wanted)
        if any(wanted):
            ctx.present = [u is not None for u in units]
            ctx.finite = finite if isinstance(finite, bool) else None
            ctx.save_for_backward(*[u for u in units if u is not None], *(() if ctx.finite is not None else (finite,)))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        units = list(ctx.saved_tensors)
        # The reference's where(finite, loss, nan): no gradient reaches a non-finite block.
        if ctx.finite is None:
            grad = torch.where(units.pop(), grad, 0)
        elif not ctx.finite:
            grad = torch.zeros_like(grad)
        scaled = iter(torch._foreach_mul(units, grad) if units else ())
        grads = [next(scaled) if present else None for present in ctx.present]
        return grads[0], None, *grads[1:]


def _loss_and_unit_gradients(y_tokens: Tensor, x_tokens: Tensor, layers: tuple, wanted: tuple[bool, ...]):
    """The loss, whether the tokens were finite, and the gradients for a unit upstream gradient.

    ``layers`` as :func:`_layers` lists them; ``wanted`` says which of
    ``(y_tokens, *layers)`` need a gradient. With ``A = [pre_proj(y); x]`` as rows,
    ``H1 = relu(A W1^T + b1)``, ``H2 = relu(H1 W2^T + b2)``, the target is
    ``H2[R:] W3^T + b3`` and the prediction ``(H2[:R] W3^T + b3) Wp^T + bp``
    (``R = B k``); the backward runs over the R prediction rows only, as autograd's
    would. ``finite`` is a Python bool for CPU tensors (reading it costs nothing
    there) and a 0-dim tensor elsewhere (no host sync); non-finite tokens are
    replaced by zeros, as in :class:`~simfx.runtime.heads.BoundaryObjective`.

    With many rows the prediction side runs through ``M = Wp W3`` (one ``d x d``
    product per step) instead of ``W3`` then ``Wp``: the same linear map, by
    associativity, for two of the four ``R x d x d`` products of the forward and
    backward of those layers (the gradients of ``W3``, ``b3`` and ``Wp`` follow from
    ``G^T H2`` with ``d x d x d`` products; see :func:`_prediction_backward`).
    """
    pre_w, w1, b1, w2, b2, w3, b3, wp, bp = layers
    batch, k, c_out = y_tokens.shape
    c_in = x_tokens.shape[-1]
    rows = batch * k
    y_rows = None
    if pre_w is None:
        stacked = torch.cat([y_tokens, x_tokens]).view(2 * rows, c_in)
        finite = _all_finite(stacked)
        stacked = _zeros_unless(finite, stacked)
    else:
        y_rows, x_rows = y_tokens.reshape(rows, c_out), x_tokens.reshape(rows, c_in)
        finite = _all_finite(y_rows, x_rows)
        y_rows, x_rows = _zeros_unless(finite, y_rows), _zeros_unless(finite, x_rows)
        stacked = torch.cat([torch.mm(y_rows, pre_w.t()), x_rows])
    h1 = F.linear(stacked, w1, b1).relu_()
    h2 = F.linear(h1, w2, b2).relu_()
    h2_y = h2[:rows]
    dim = w3.shape[0]
    # Prediction and target side by side in float32: both are standardised by the same calls.
    pair = torch.empty(2, rows, dim, dtype=torch.float32, device=h2.device)
    folded = rows >= 2 * dim
    if folded:
        m = torch.mm(wp, w3)
        _linear_into(pair[0], h2_y, m, torch.addmv(bp, wp, b3))
        _linear_into(pair[1], h2[rows:], w3, b3)
    else:
        z = F.linear(h2, w3, b3)
        z_y = z[:rows]
        _linear_into(pair[0], z_y, wp, bp)
        pair[1].copy_(z[rows:])
    loss, saved = norm_mse_forward_stacked(pair.view(2, batch, k, dim))
    if finite is False:
        loss = torch.full_like(loss, float("nan"))
    elif finite is not True:
        loss = torch.where(finite, loss, float("nan"))
    if not any(wanted):
        return loss, finite, []

    # Computed on zeros where the tokens were not finite, so these are finite too.
    g = norm_mse_backward(saved, 1.0).to(h2.dtype).view(rows, dim)
    del saved, pair
    grads = {"bp": g.sum(0)}
    if folded:
        gm = torch.mm(g.t(), h2_y)
        grads["wp"] = torch.addr(torch.mm(gm, w3.t()), grads["bp"], b3)
        grads["w3"], grads["b3"] = torch.mm(wp.t(), gm), torch.mv(wp.t(), grads["bp"])
        g = torch.mm(g, m)
    else:
        grads["wp"] = torch.mm(g.t(), z_y)
        g = torch.mm(g, wp)
        grads["w3"], grads["b3"] = torch.mm(g.t(), h2_y), g.sum(0)
        g = torch.mm(g, w3)
    g = torch.ops.aten.threshold_backward(g, h2_y, 0)
    h1_y = h1[:rows]
    grads["w2"], grads["b2"] = torch.mm(g.t(), h1_y), g.sum(0)
    g = torch.ops.aten.threshold_backward(torch.mm(g, w2), h1_y, 0)
    grads["w1"], grads["b1"] = torch.mm(g.t(), stacked[:rows]), g.sum(0)
    g_y = None
    if pre_w is not None:
        g = torch.mm(g, w1)
        grads["pre_w"] = torch.mm(g.t(), y_rows)
        if wanted[0]:
            g_y = torch.mm(g, pre_w)
    elif wanted[0]:
        g_y = torch.mm(g, w1)
    units = [g_y.view(batch, k, c_out) if g_y is not None else None]
    units += [grads.get(name) if wanted[1 + i] else None for i, name in enumerate(_LAYER_NAMES)]
    return loss, finite, units


_LAYER_NAMES = ("pre_w", "w1", "b1", "w2", "b2", "w3", "b3", "wp", "bp")


def _linear_into(out: Tensor, rows: Tensor, weight: Tensor, bias: Tensor) -> None:
    """``out = rows W^T + b``, cast to ``out``'s dtype (float32, where the loss maths runs)."""
    if out.dtype == rows.dtype:
        torch.addmm(bias, rows, weight.t(), out=out)
    else:
        out.copy_(F.linear(rows, weight, bias))


def _all_finite(*tensors: Tensor):
    """Whether every value is finite: a bool for CPU tensors, a 0-dim tensor elsewhere.

    One NaN-propagating ``abs().amax()`` per tensor, as exact as ``isfinite(t).all()``
    and several times cheaper on CPU.
    """
    largest = tensors[0].abs().amax()
    for t in tensors[1:]:
        largest = torch.maximum(largest, t.abs().amax())
    finite = torch.isfinite(largest)
    # Fake and functional tensors (shape propagation, export) have no value to read.
    return bool(finite) if finite.device.type == "cpu" and type(finite) is torch.Tensor else finite


def _zeros_unless(finite, t: Tensor) -> Tensor:
    """``t`` where the tokens were finite, zeros elsewhere (``t`` may be the caller's: never written)."""
    if finite is True:
        return t
    if finite is False:
        return torch.zeros_like(t)
    return torch.where(finite, t, 0)


# --- under torch.compile (CPU): one opaque operator per block -----------------------------
#
# Compiled, the reference is some 40 nodes per block that inductor turns into C++
# kernels, and compiling those made the first step of a transformed resnet18 about
# 1.6x the plain model's. On a CPU those kernels run no faster than the eager ones
# (the compiled plain model is slower than the eager one there), so the compiled graph
# calls this operator instead: the eager computation above, opaque to the compiler,
# with its gradients scaled in the backward by a second opaque operator.


@torch.library.custom_op("simfx::rho_sim_norm_mse", mutates_args=())
def _rho_sim_op(
    y_tokens: Tensor, x_tokens: Tensor, pre_w: Optional[Tensor], w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    w3: Tensor, b3: Tensor, wp: Tensor, bp: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, finite, *unit gradients of (y_tokens, pre_w, w1, ..., bp))``; ``pre_w``'s is empty without it."""
    return _operator_outputs(y_tokens, x_tokens, (pre_w, w1, b1, w2, b2, w3, b3, wp, bp))


def _operator_outputs(y_tokens: Tensor, x_tokens: Tensor, layers: tuple) -> tuple:
    """``(loss, finite, *units)`` of :func:`_loss_and_unit_gradients` as an operator returns them: all tensors."""
    loss, finite, units = _loss_and_unit_gradients(y_tokens, x_tokens, layers, (True,) * 10)
    if isinstance(finite, bool):
        finite = torch.tensor(finite, device=loss.device)
    if layers[0] is None:
        units[1] = y_tokens.new_empty(0)
    return (loss, finite, *units)


@_rho_sim_op.register_fake
def _(y_tokens, x_tokens, pre_w, w1, b1, w2, b2, w3, b3, wp, bp):
    loss = y_tokens.new_empty((), dtype=torch.float32)
    finite = y_tokens.new_empty((), dtype=torch.bool)
    units = [y_tokens.new_empty(y_tokens.shape), y_tokens.new_empty(0) if pre_w is None else torch.empty_like(pre_w)]
    return (loss, finite, *units, *(torch.empty_like(t) for t in (w1, b1, w2, b2, w3, b3, wp, bp)))


def _setup_op(ctx, inputs, output):
    ctx.has_pre = inputs[2] is not None
    ctx.save_for_backward(*output[1:])


def _op_backward(ctx, grad, *_):
    finite, *units = ctx.saved_tensors
    if not ctx.has_pre:
        del units[1]
    scaled = torch.ops.simfx.scale_unit_gradients(grad, finite, units)
    if not ctx.has_pre:
        scaled.insert(1, None)
    return scaled[0], None, *scaled[1:]


_rho_sim_op.register_autograd(_op_backward, setup_context=_setup_op)


@torch.library.custom_op("simfx::scale_unit_gradients", mutates_args=())
def _scale_op(grad: Tensor, finite: Tensor, units: List[Tensor]) -> List[Tensor]:
    """The loss operator's backward: :func:`_scaled_units` as an operator of its own."""
    return _scaled_units(grad, finite, units)


def _scaled_units(grad: Tensor, finite: Tensor, units: List[Tensor]) -> List[Tensor]:
    """``units * grad`` where the block was finite, zeros elsewhere (the reference's ``where``)."""
    return list(torch._foreach_mul(units, torch.where(finite, grad, 0)))


@_scale_op.register_fake
def _(grad, finite, units):
    return [torch.empty_like(u) for u in units]


# --- under torch.compile (CPU): the whole block, sampling included, as one operator -------
#
# With only the loss opaque, inductor still built C++ kernels for each block's token
# sampling (the draw, the gathers, the pooling of strided blocks) and for the scatter
# of the sampled tokens' gradient: most of what a transformed resnet18 still added to
# its first compile (+17 s on a 33 s plain compile, against +4 s with sampling off).
# This operator runs the eager sampling of :func:`~simfx.runtime.tokens.sample_block_tokens`
# and the loss above in one call; its backward writes the scaled token gradient into a
# zero map with :func:`~simfx.runtime.tokens.put_tokens`. The draw happens inside, from
# torch's global generator, as in eager mode: a resnet18 compiled with inductor gave the
# eager model's sampled losses for the same seed (the reference expression, compiled on a
# GPU, draws from inductor's own random streams instead).


def rho_sim_block_loss(objective: nn.Module, x: Tensor, y: Tensor, sampling: dict) -> Tensor | None:
    """Under ``torch.compile`` on a CPU, the block's loss as one operator; ``None`` where it does not apply.

    ``x`` and ``y`` are the block's input and output; ``sampling`` is
    :meth:`~simfx.runtime.heads.BoundaryObjective.sampling`. It applies where the fast
    path does (:func:`_layers`) and where the gradient's token view is a view of a
    plain map: tokens per sample (``y`` of rank 3 or more) with channels first or last.
    """
    rank, channel_dim = y.dim(), sampling["out_channel_dim"]
    if rank < 3 or channel_dim not in (1, rank - 1) or y.numel() == 0:
        return None
    if _tokens_per_sample(y, channel_dim) < 2:
        return None  # one token: norm_mse's special case
    layers = _layers(objective, x, y)
    if layers is None:
        return None
    ratio = sampling["ratio"]
    return torch.ops.simfx.rho_sim_block(
        x, y, *layers, sampling["in_channel_dim"], channel_dim, sampling["in_channels"], sampling["out_channels"],
        ratio[0], ratio[1], sampling["min_tokens"], sampling["strategy"],
    )[0]


def _tokens_per_sample(y: Tensor, channel_dim: int) -> int:
    """N of ``to_tokens(y)`` for a map of rank 3 or more: its positions per sample.

    A product of the other sizes, not a division, so that under ``torch.compile`` a
    symbolic size stays symbolic (dividing by a size guards on its value).
    """
    n = 1
    for axis, size in enumerate(y.shape):
        if axis not in (0, channel_dim):
            n = n * size
    return n


# torch >= 2.6 takes tags: "seeded" so the partitioner never recomputes a draw, and a
# flexible layout so inductor hands over the maps in the layout it chose for them
# (channels_last for a CNN on a CPU) instead of copying each block's input and output
# into the strides eager tracing saw. Those copies, stored by the kernels that computed
# the maps, made the kernels of a ResNet's repeated blocks differ, so inductor built each
# one separately, each a C++ build in the first compile (resnet18: 19 forward kernels
# against the plain model's 13; 15 with this tag). The operator computes the same values
# for any strides (tests/test_fast_paths.py). torch 2.5 takes no tags here, and gives
# custom operators a flexible layout by default.
_BLOCK_TAGS = {"tags": (torch.Tag.nondeterministic_seeded, torch.Tag.flexible_layout)} if "tags" in inspect.signature(
    torch.library.custom_op).parameters else {}


@torch.library.custom_op("simfx::rho_sim_block", mutates_args=(), **_BLOCK_TAGS)
def _block_op(
    x: Tensor, y: Tensor, pre_w: Optional[Tensor], w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor,
    b3: Tensor, wp: Tensor, bp: Tensor, in_channel_dim: int, out_channel_dim: int, in_channels: int,
    out_channels: int, numerator: int, denominator: int, min_tokens: int, strategy: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, finite, index, *unit gradients of (y_tokens, pre_w, w1, ..., bp))``.

    ``index`` is empty when every token was used; ``pre_w``'s gradient is empty without it.
    """
    x_tokens, y_tokens, index = sample_block_tokens(
        x, y, in_channel_dim=in_channel_dim, out_channel_dim=out_channel_dim, in_channels=in_channels,
        out_channels=out_channels, ratio=(numerator, denominator), min_tokens=min_tokens, strategy=strategy)
    loss, finite, *units = _operator_outputs(y_tokens, x_tokens, (pre_w, w1, b1, w2, b2, w3, b3, wp, bp))
    # A per-sample draw is a slice of its sort: contiguous, as the fake kernel says.
    index = torch.empty(0, dtype=torch.long, device=y.device) if index is None else index.contiguous()
    return (loss, finite, index, *units)


@_block_op.register_fake
def _(x, y, pre_w, w1, b1, w2, b2, w3, b3, wp, bp, in_channel_dim, out_channel_dim, in_channels, out_channels,
      numerator, denominator, min_tokens, strategy):
    batch = y.shape[0]
    n = _tokens_per_sample(y, out_channel_dim)
    k = sample_count(n, numerator, denominator, min_tokens)
    index_shape = (0,) if k >= n else (k,) if strategy == "shared" else (batch, k)
    return (
        y.new_empty((), dtype=torch.float32), y.new_empty((), dtype=torch.bool),
        y.new_empty(index_shape, dtype=torch.long), y.new_empty((batch, k, out_channels)),
        y.new_empty(0) if pre_w is None else torch.empty_like(pre_w),
        *(torch.empty_like(t) for t in (w1, b1, w2, b2, w3, b3, wp, bp)),
    )


def _setup_block(ctx, inputs, output):
    y, pre_w = inputs[1], inputs[2]
    ctx.has_pre = pre_w is not None
    ctx.y_size = list(y.shape)
    ctx.out_channel_dim, ctx.out_channels = inputs[12], inputs[14]
    # An NCHW map stored channels-last gets its gradient in that format; every other map a
    # contiguous one (the layouts whose token views put_tokens can write through).
    ctx.channels_last = (y.dim() == 4 and ctx.out_channel_dim == 1 and not y.is_contiguous()
                         and y.is_contiguous(memory_format=torch.channels_last))
    ctx.save_for_backward(*output[1:])


def _block_backward(ctx, grad, *_):
    finite, index, g_y, g_pre, *units = ctx.saved_tensors
    if ctx.has_pre:
        units.insert(0, g_pre)
    grad_y, *scaled = torch.ops.simfx.rho_sim_block_backward(
        grad, finite, index, g_y, units, ctx.y_size, ctx.channels_last, ctx.out_channel_dim, ctx.out_channels)
    if not ctx.has_pre:
        scaled.insert(0, None)
    return None, grad_y, *scaled, *(None,) * 8


_block_op.register_autograd(_block_backward, setup_context=_setup_block)


@torch.library.custom_op("simfx::rho_sim_block_backward", mutates_args=())
def _block_backward_op(
    grad: Tensor, finite: Tensor, index: Tensor, g_y: Tensor, units: List[Tensor], y_size: List[int],
    channels_last: bool, out_channel_dim: int, out_channels: int,
) -> List[Tensor]:
    """``[gradient of y, *scaled units]``: the unit gradients times ``grad``, zeros for a non-finite block."""
    scaled = _scaled_units(grad, finite, [g_y, *units])
    grad_y = _zero_map(y_size, g_y, channels_last)
    # A view of grad_y, which put_tokens writes through: grad_y is dense and fresh, and
    # rho_sim_block_loss admits only channels first or last, whose token views of a dense
    # map (narrowed or not) are views (tests/test_fast_paths.py checks each layout).
    tokens = to_tokens(narrow_channels(grad_y, out_channel_dim, out_channels), out_channel_dim)
    put_tokens(tokens, index if index.numel() else None, scaled[0])
    return [grad_y, *scaled[1:]]


@_block_backward_op.register_fake
def _(grad, finite, index, g_y, units, y_size, channels_last, out_channel_dim, out_channels):
    return [_zero_map(y_size, g_y, channels_last), *(torch.empty_like(u) for u in units)]


def _zero_map(size: list, like: Tensor, channels_last: bool) -> Tensor:
    """A zero gradient for the block's output, in its memory format."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(size, dtype=like.dtype, device=like.device, memory_format=memory_format).zero_()
