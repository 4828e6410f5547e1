"""Random small architectures for the property tests (hypothesis strategies).

A drawn :class:`ArchSpec` is plain data; :func:`build` turns it into an
``nn.Module`` (the same spec always builds the same architecture, so a fresh
copy can load a checkpoint). The space covers what ``simfx.transform`` must
handle:

* activation layouts ``nchw`` (B, C, H, W), ``nhwc`` (B, H, W, C), ``bnc``
  (B, N, C) and ``bc`` (B, C);
* blocks made of convolutions, linear layers or attention, computing in their
  own layout (an ``nhwc`` block may permute to NCHW for a convolution, Swin
  style);
* residual (``x + f(x)``, or ``f(x) + shortcut(x)`` when the shape changes) and
  plain blocks, strided (halving the grid or token count) and channel-changing;
* batch sizes 1..4 and odd spatial sizes down to 1x1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

LAYOUTS = ("nchw", "nhwc", "bnc", "bc")
# Which block kinds make sense on each layout.
KINDS = {
    "nchw": ("conv", "linear", "attention"),
    "nhwc": ("conv", "linear", "attention"),
    "bnc": ("conv", "linear", "attention"),
    "bc": ("linear",),
}


@dataclass(frozen=True)
class BlockSpec:
    kind: str          # "conv", "linear" or "attention"
    out_channels: int
    stride: int        # 2 halves the grid (nchw/nhwc) or the token count (bnc)
    residual: bool
    norm: bool


@dataclass(frozen=True)
class ArchSpec:
    layout: str
    in_channels: int
    width: int
    size: tuple[int, ...]   # (H, W) for maps, (N,) for sequences, () for bc
    batch: int
    blocks: tuple[BlockSpec, ...]
    classes: int = 3

    def example(self, batch: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random input for this architecture (channel-first maps, channel-last sequences)."""
        b = self.batch if batch is None else batch
        if self.layout in ("nchw", "nhwc"):
            shape = (b, self.in_channels, *self.size)
        elif self.layout == "bnc":
            shape = (b, *self.size, self.in_channels)
        else:
            shape = (b, self.in_channels)
        return torch.randn(shape, generator=generator)


def _heads(width: int) -> int:
    return 2 if width % 2 == 0 else 1


@st.composite
def block_specs(draw, layout: str, width: int, grid: tuple[int, ...]) -> BlockSpec:
    kind = draw(st.sampled_from(KINDS[layout]))
    out = draw(st.sampled_from((width, width, 2 * width, max(2, width // 2))))
    if kind == "attention":
        out = width  # attention keeps its width; a width change comes from other blocks
    can_stride = layout != "bc" and kind != "attention" and all(s >= 2 for s in grid)
    stride = draw(st.sampled_from((1, 2))) if can_stride else 1
    residual = draw(st.booleans())
    norm = draw(st.booleans())
    return BlockSpec(kind, out, stride, residual, norm)


@st.composite
def arch_specs(draw, max_blocks: int = 4) -> ArchSpec:
    layout = draw(st.sampled_from(LAYOUTS))
    in_channels = draw(st.integers(1, 4))
    stem_width = draw(st.sampled_from((4, 6, 8, 12)))
    if layout in ("nchw", "nhwc"):
        size = (draw(st.sampled_from((1, 3, 5, 7))), draw(st.sampled_from((1, 2, 3, 5))))
    elif layout == "bnc":
        size = (draw(st.sampled_from((1, 2, 3, 5, 7, 9))),)
    else:
        size = ()
    batch = draw(st.integers(1, 4))
    blocks, width, grid = [], stem_width, size
    for _ in range(draw(st.integers(1, max_blocks))):
        spec = draw(block_specs(layout, width, grid))
        blocks.append(spec)
        width, grid = spec.out_channels, _strided(grid, spec.stride)
    return ArchSpec(layout, in_channels, stem_width, size, batch, tuple(blocks))


def _strided(grid: tuple[int, ...], stride: int) -> tuple[int, ...]:
    return tuple((s + stride - 1) // stride for s in grid)


# --- building ---------------------------------------------------------------------


def build(spec: ArchSpec) -> nn.Module:
    """The model a spec describes (weights from the global torch RNG)."""
    return ArchNet(spec)


class ArchNet(nn.Module):
    """stem (into the spec's layout) -> blocks (nn.Sequential) -> pooled linear head."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.layout = spec.layout
        self.stem = nn.Conv2d(spec.in_channels, spec.width, 1) if spec.layout == "nchw" else nn.Linear(
            spec.in_channels, spec.width
        )
        blocks, width, grid = [], spec.width, spec.size
        for b in spec.blocks:
            grid = _strided(grid, b.stride)
            blocks.append(Block(spec.layout, width, b, grid))
            width = b.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, spec.classes)

    def forward(self, x):
        if self.layout == "nhwc":
            x = x.permute(0, 2, 3, 1)
        x = self.blocks(self.stem(x))
        pooled = {"nchw": (2, 3), "nhwc": (1, 2), "bnc": (1,), "bc": ()}[self.layout]
        return self.head(x.mean(dim=pooled) if pooled else x)


class Block(nn.Module):
    """One block computing ``f(x)`` in its layout, plus ``x`` or a shortcut when residual."""

    def __init__(self, layout: str, cin: int, spec: BlockSpec, out_grid: tuple[int, ...]):
        super().__init__()
        self.layout, self.kind, self.stride, self.residual = layout, spec.kind, spec.stride, spec.residual
        cout = spec.out_channels
        if spec.kind == "conv":
            dims = 1 if layout == "bnc" else 2
            conv = (nn.Conv1d, nn.Conv2d)[dims - 1]
            self.conv = conv(cin, cout, 3, spec.stride, 1)
            # BatchNorm needs two values per channel in training; a 1x1 grid at batch 1 has one.
            positions = 1
            for s in out_grid:
                positions *= s
            if not spec.norm:
                self.norm = nn.Identity()
            elif positions >= 2:
                self.norm = (nn.BatchNorm1d, nn.BatchNorm2d)[dims - 1](cout)
            else:
                self.norm = nn.GroupNorm(1, cout)
        elif spec.kind == "linear":
            self.norm = nn.LayerNorm(cin) if spec.norm else nn.Identity()
            self.fc1, self.fc2 = nn.Linear(cin, 2 * cout), nn.Linear(2 * cout, cout)
        else:
            self.norm = nn.LayerNorm(cin) if spec.norm else nn.Identity()
            self.attn = nn.MultiheadAttention(cin, _heads(cin), batch_first=True)
        self.shortcut = None
        if spec.residual and (cin != cout or spec.stride != 1):
            self.shortcut = (
                nn.Conv2d(cin, cout, 1, spec.stride) if layout == "nchw" else nn.Linear(cin, cout)
            )

    def forward(self, x):
        out = self._body(x)
        if not self.residual:
            return out
        if self.shortcut is None:
            return out + x
        if self.layout == "nchw":
            return out + self.shortcut(x)
        return out + self.shortcut(self._subsample(x))

    def _subsample(self, x):
        """Every stride-th position of the grid, in this block's layout."""
        s = self.stride
        if s == 1:
            return x
        if self.layout == "nchw":
            return x[:, :, ::s, ::s]
        if self.layout == "nhwc":
            return x[:, ::s, ::s, :]
        return x[:, ::s, :]

    def _body(self, x):
        layout = self.layout
        if self.kind == "conv":
            if layout == "nchw":
                return torch.relu(self.norm(self.conv(x)))
            if layout == "nhwc":  # Swin style: permute to channel-first for the convolution
                return torch.relu(self.norm(self.conv(x.permute(0, 3, 1, 2)))).permute(0, 2, 3, 1)
            return torch.relu(self.norm(self.conv(x.transpose(1, 2)))).transpose(1, 2)
        if self.kind == "linear":
            h = self._subsample(x)
            if layout == "nchw":
                h = h.permute(0, 2, 3, 1)
            h = self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(h))))
            return h.permute(0, 3, 1, 2) if layout == "nchw" else h
        # attention over the grid's positions, as one token sequence (reshapes read
        # x.shape whole: fx cannot unpack a traced shape)
        tokens = x.flatten(2).transpose(1, 2) if layout == "nchw" else x.flatten(1, -2)
        tokens = self.norm(tokens)
        out, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        if layout == "nchw":
            return out.transpose(1, 2).reshape(x.shape)
        return out.reshape(x.shape)
