"""Results as an aligned text table: the benchmarks' and the sweep's summaries."""

from typing import Any, Callable, Mapping, Sequence


def number_cell(value: Any) -> str:
    """Three significant figures for small floats, one decimal for larger ones, as is otherwise."""
    if isinstance(value, float):
        return f"{value:.3g}" if value < 10 else f"{value:.1f}"
    return str(value)


def rate_cell(value: Any) -> str:
    """Rates as whole numbers, ratios (below 100) to two decimals, as is otherwise."""
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], headers: Sequence[str] = (),
                 cell: Callable[[Any], str] = number_cell) -> str:
    """One line per row under a header line and a rule; the first column left-aligned, the
    others right-aligned. A row without a column shows an empty cell."""
    lines = [list(headers or columns)] + [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    text = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))).rstrip()
            for line in lines]
    text.insert(1, "-" * max(len(t) for t in text))
    return "\n".join(text)
