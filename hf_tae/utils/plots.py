"""Plots people would rather look at than tables (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path

from hf_tae.utils.io import atomic_write_bytes


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed; set once per process)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``path`` as PNG atomically and close it."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_task_scores(
    series: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    ylabel: str = "score",
    title: str | None = None,
) -> Path:
    """Grouped bar chart of per-task scores, one bar colour per series; written atomically as PNG."""
    import numpy as np

    plt = pyplot()

    tasks = list(next(iter(series.values())))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(tasks) + 2), 3.6))
    for k, (label, scores) in enumerate(series.items()):
        ax.bar(np.arange(len(tasks)) + k * width, [scores[t] for t in tasks], width, label=label)
    ax.set_xticks(
        np.arange(len(tasks)) + width * (len(series) - 1) / 2,
        tasks,
        rotation=60,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    top = max((v for scores in series.values() for v in scores.values()), default=1.0)
    ax.set_ylim(0, top * 1.2 if top > 0 else 1.0)  # headroom so the legend never hides a bar
    ax.legend(fontsize=8, loc="upper center", ncol=len(series), frameon=False)
    return save_figure(fig, path, dpi=120)
