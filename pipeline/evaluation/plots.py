"""Evaluation plots: PNG images for people and CSV/JSON data for `dvc plots`."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def cosine_histogram(
    path: str | Path, series: Mapping[str, np.ndarray], title: str, bins: int = 30
) -> Path:
    """Overlaid histograms of per-track cosines (e.g. raw and centred, student and baseline)."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    values = [np.asarray(v, dtype=float) for v in series.values() if len(v)]
    lo = min([-1.0] + [float(v.min()) for v in values])
    edges = np.linspace(lo, 1.0, bins + 1)
    for label, v in series.items():
        if len(v):
            ax.hist(np.asarray(v, dtype=float), bins=edges, alpha=0.55, label=label)
    ax.set_xlabel("cosine to the teacher")
    ax.set_ylabel("tracks")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def agreement_bars(path: str | Path, results: Mapping[str, Mapping[str, float]], metrics: Sequence[str], title: str) -> Path:
    """Grouped bars: one group per comparison (audio student, text student, end to end)."""
    plt = _pyplot()
    path = Path(path)
    names = list(results)
    x = np.arange(len(names))
    width = 0.8 / max(1, len(metrics))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for i, metric in enumerate(metrics):
        ax.bar(x + (i - (len(metrics) - 1) / 2) * width, [results[n][metric] for n in names], width, label=metric)
    ax.set_xticks(x, names)
    ax.set_ylim(min(0.0, *(results[n][m] for n in names for m in metrics)) - 0.05, 1.05)
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_csv(path: str | Path, rows: Sequence[Mapping[str, object]]) -> Path:
    """Rows of equal keys -> CSV with a header (the format `dvc plots` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def write_json(path: str | Path, rows: Sequence[Mapping[str, object]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(rows), indent=1) + "\n", encoding="utf-8")
    return path
