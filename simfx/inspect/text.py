"""How simfx writes numbers, shapes and tables in its reports (``find_boundaries``, ``explain``, ``draw``)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["shape_text", "count_text", "format_table"]


def shape_text(shape, *, batch: bool = True) -> str:
    """``(2, 64, 16, 16)`` -> ``2x64x16x16`` (``64x16x16`` without the batch axis); ``-`` when unknown.

    >>> shape_text((2, 64, 16, 16)), shape_text((2, 64, 16, 16), batch=False), shape_text(None)
    ('2x64x16x16', '64x16x16', '-')
    """
    if not shape or not all(isinstance(s, int) for s in shape):
        return "-"
    return "x".join(str(s) for s in (shape if batch else shape[1:])) or "scalar"


def count_text(n: int | None) -> str:
    """12345678 -> '12.3M' (k, M, G, T with three significant digits); ``?`` when unknown.

    >>> count_text(12345678), count_text(950), count_text(None)
    ('12.3M', '950', '?')
    """
    if n is None:
        return "?"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g}{unit}" if value < 1000 else f"{value:.0f}{unit}"
    return str(n)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False) -> str:
    """Align ``rows`` under ``header`` as plain text, or as a Markdown pipe table.

    >>> print(format_table(["a", "bb"], [["1", "2"]]))
    a  bb
    -  --
    1  2
    """
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    if markdown:
        def line(cells):
            return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
        return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
