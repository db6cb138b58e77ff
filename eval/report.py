"""Report pieces every benchmark uses: markdown tables in the papers' layout and a grouped bar chart (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

from assistant.files import write_text_atomic

matplotlib.use("Agg")  # files only: no display needed, safe in threads and on servers
import matplotlib.pyplot as plt  # noqa: E402

REPORT_FILE = "report.md"
CHART_FILE = "chart.png"


def fmt(value: float | None, digits: int = 2) -> str:
    """A table cell: '-' where a metric is undefined (e.g. AUROC of a single-class category)."""
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def bar_chart(
    path: Path, groups: Sequence[str], series: dict[str, Sequence[float | None]], title: str, ylabel: str
) -> None:
    """Grouped bars: one group per metric, one bar per model (undefined values are left out)."""
    figure, axes = plt.subplots(figsize=(min(14.0, max(6.0, 0.22 * len(groups) * len(series) + 3)), 4.5))
    width = 0.8 / max(1, len(series))
    for number, (name, values) in enumerate(series.items()):
        positions = [g + (number - (len(series) - 1) / 2) * width for g, v in enumerate(values) if v is not None]
        axes.bar(positions, [v for v in values if v is not None], width, label=name)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, max(1, len(series))))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(directory: Path, sections: Sequence[str]) -> Path:
    return write_text_atomic(directory / REPORT_FILE, "\n\n".join(sections) + "\n")


def domain_line(in_domain: Sequence[bool | None]) -> str:
    """The share of evaluated images outside the model's domain (`Verdict.in_domain`; None = not checked)."""
    checked = [flag for flag in in_domain if flag is not None]
    if not checked:
        return "Domain: unknown (the model carries no domain statistics, or the backend cannot check them)."
    outside = sum(not flag for flag in checked)
    return f"Out of the model's domain: {outside} of {len(checked)} images ({outside / len(checked):.1%})."
