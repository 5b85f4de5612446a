"""Number and table formatting shared by the cost model's reports and the command line."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["fmt_bytes", "fmt_count", "fmt_seconds", "fmt_si", "render_columns", "render_table"]


def fmt_si(value: float, unit: str, digits: int = 3) -> str:
    """``1.234e12, "FLOP"`` -> ``"1.234 TFLOP"`` (decimal prefixes k, M, G, T, P)."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def fmt_count(value: float) -> str:
    """A count with a K/M/B suffix: ``202383360`` -> ``"202.383 M"``."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3f} {suffix}"
    return f"{value:.0f}"


def fmt_bytes(value: float) -> str:
    """Bytes in binary units: ``"203.00 MiB"``."""
    for scale, prefix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}"
    return f"{value:.0f} B"


def fmt_seconds(value: float) -> str:
    """Seconds as ``"12.3 ms"`` below one second, else ``"1.23 s"``."""
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def render_table(title: Sequence[str], header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An aligned text table under ``title`` lines.

    ``header`` has four cells; a row is ``(label, stock, dpvr, note)`` or ``(label, text)``, the text
    spanning the other columns.
    """
    full = [r for r in rows if len(r) == 4]
    w0 = max(len(header[0]), *(len(r[0]) for r in rows))
    w1 = max(len(header[1]), *(len(r[1]) for r in full)) if full else len(header[1])
    w2 = max(len(header[2]), *(len(r[2]) for r in full)) if full else len(header[2])
    lines = list(title)
    head = f"  {header[0]:<{w0}}  {header[1]:>{w1}}  {header[2]:>{w2}}  {header[3]}"
    lines += [head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        if len(r) == 4:
            lines.append(f"  {r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>{w2}}  {r[3]}".rstrip())
        else:
            lines.append(f"  {r[0]:<{w0}}  {r[1]}".rstrip())
    return "\n".join(lines)


def render_columns(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A plain aligned table of any number of columns: the first ``left`` columns left-aligned, the rest right."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(f"{c:<{w}}" if i < left else f"{c:>{w}}"
                                for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    head = line(header)
    return "\n".join([head, "  " + "-" * (len(head) - 2), *(line(r) for r in rows)])
