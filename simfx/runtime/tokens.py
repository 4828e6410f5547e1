"""Token plumbing shared by every objective: layout, resolution match, sampling.

All functions branch only on shapes (never on tensor values), draw random
numbers only with torch on the activation's device, and select with
``index_select``/``gather``, so they run under ``torch.compile(fullgraph=True)``
and inside CUDA graphs.

Random-number contract (what a fixed seed reproduces), per block and step:

* ``shared``: ``torch.rand(N).argsort()[:k]`` — one draw for the batch;
* ``per_sample``: ``torch.rand(B, N).argsort(dim=1)[:, :k]``;
* ``topk_mean``: ``torch.rand(B, N).argsort(dim=1)[:, :min(3k, N)]``, then the k
  candidates with the largest channel-mean input activation.

When ``k == N`` (``token_ratio=1.0``) no draw happens and every token is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["to_tokens", "input_tokens_on_output_grid", "sample_count", "sample_pair", "take_tokens"]

_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_WINDOW_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def to_tokens(t: Tensor, channel_dim: int) -> Tensor:
    """View ``t`` as ``(B, N, C)``; a ``(B, C)`` value is one sequence of B tokens ``(1, B, C)``.

    For channel-first maps this is ``flatten(2).transpose(1, 2)``: a strided view,
    so sampling afterwards copies only the k sampled tokens, never the whole map.

    >>> to_tokens(torch.zeros(2, 8, 4, 4), 1).shape
    torch.Size([2, 16, 8])
    >>> to_tokens(torch.zeros(5, 8), 1).shape
    torch.Size([1, 5, 8])
    """
    rank = t.dim()
    if rank == 2:
        return t.unsqueeze(0)
    if channel_dim == rank - 1:
        return t.flatten(1, -2)
    if channel_dim == 1:
        return t.flatten(2).transpose(1, 2)
    return t.movedim(channel_dim, -1).flatten(1, -2)


def _grid(t: Tensor, channel_dim: int) -> list:
    return [s for i, s in enumerate(t.shape) if i not in (0, channel_dim)]


def input_tokens_on_output_grid(x: Tensor, x_channel_dim: int, y: Tensor, y_channel_dim: int) -> Tensor:
    """Tokens of ``x`` aligned with ``to_tokens(y)``: token i of both covers the same region.

    Blocks that change resolution (strided convolutions, patch merging) get ``x``
    average-pooled onto ``y``'s grid; a ``(B, C)`` output takes the global mean of
    a spatial input.
    """
    if y.dim() == 2:
        if x.dim() > 2:
            x = x.mean(dim=[i for i in range(1, x.dim()) if i != x_channel_dim])
        return x.unsqueeze(0)
    x_grid, y_grid = _grid(x, x_channel_dim), _grid(y, y_channel_dim)
    if x_grid == y_grid:
        return to_tokens(x, x_channel_dim)
    if len(x_grid) == len(y_grid) and len(x_grid) in _POOL:
        channel_first = x.movedim(x_channel_dim, 1)
        if all(a % b == 0 for a, b in zip(x_grid, y_grid)):
            # Whole windows: the same averages as the adaptive pool, by a kernel
            # that ran about 1.5x faster on CPU.
            factors = [a // b for a, b in zip(x_grid, y_grid)]
            pooled = _WINDOW_POOL[len(x_grid)](channel_first, factors, factors)
        else:
            pooled = _POOL[len(x_grid)](channel_first, y_grid)
        return to_tokens(pooled, 1)
    tokens = to_tokens(x, x_channel_dim)
    return F.adaptive_avg_pool1d(tokens.transpose(1, 2), to_tokens(y, y_channel_dim).shape[1]).transpose(1, 2)


def sample_count(n: int, numerator: int, denominator: int, minimum: int = 2) -> int:
    """``min(N, max(minimum, floor(N * ratio)))`` with integer maths (SymInt-safe)."""
    k = (n * numerator) // denominator
    return min(max(k, minimum), n)


def sample_pair(x_tokens: Tensor | None, y_tokens: Tensor, k: int, strategy: str) -> tuple[Tensor | None, Tensor]:
    """Sample the same k token positions of both sides (see the module docstring)."""
    batch, n = y_tokens.shape[0], y_tokens.shape[1]
    if k >= n:
        return x_tokens, y_tokens
    device = y_tokens.device
    if strategy == "shared":
        index = torch.rand(n, device=device).argsort()[:k]
    else:
        order = torch.rand(batch, n, device=device).argsort(dim=1)
        if strategy == "topk_mean":
            candidates = order[:, : min(3 * k, n)]
            # x_tokens is there: build_objective refuses topk_mean for objectives that never compute it.
            scores = x_tokens.detach().mean(dim=-1).gather(1, candidates)
            index = candidates.gather(1, scores.topk(k, dim=1).indices)
        else:
            index = order[:, :k]
    return (take_tokens(x_tokens, index) if x_tokens is not None else None), take_tokens(y_tokens, index)


def take_tokens(tokens: Tensor, index: Tensor) -> Tensor:
    """``tokens[:, index]`` for a shared ``(k,)`` index, ``tokens[b, index[b]]`` for a ``(B, k)`` one.

    Token views of channel-first maps (``to_tokens`` of NCHW) are transposed:
    their token axis is the contiguous one. Selecting along it in the map's own
    layout, then transposing back, picks the same values; the backward then
    scatters into a gradient already shaped like the map, where selecting on the
    token view would scatter into a ``(B, N, C)`` buffer and copy all of it back
    to NCHW (one full copy of the activation per block and step).
    """
    channel_first = tokens.dim() == 3 and tokens.stride(1) == 1 and tokens.stride(2) != 1
    if channel_first:
        maps = tokens.transpose(1, 2)  # (B, C, N), N contiguous
        if index.dim() == 1:
            return maps.index_select(2, index).transpose(1, 2)
        return maps.gather(2, index.unsqueeze(1).expand(-1, maps.shape[1], -1)).transpose(1, 2)
    if index.dim() == 1:
        return tokens.index_select(1, index)
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
