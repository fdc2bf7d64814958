"""Evaluation reports: terminal table, ``metrics.json``, per-sequence CSV and success/precision plots."""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from lorat.errors import LoratError
from lorat.evaluation.metrics import (
    NORM_PRECISION_THRESHOLDS,
    P20,
    P_NORM_02,
    PRECISION_THRESHOLDS,
    SUCCESS_THRESHOLDS,
    SequenceCurves,
    summarize_curves,
)

__all__ = ["format_table", "write_report", "plot_curves", "mean_curves"]


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failure to write under ``path`` into a :class:`LoratError` naming it."""
    try:
        yield
    except OSError as err:
        raise LoratError(f"cannot write {err.filename or path}: {err.strerror or err}") from None


def mean_curves(curves: Sequence[SequenceCurves]) -> SequenceCurves:
    """Dataset curves: the mean of the per-sequence curves."""
    return SequenceCurves(*(np.mean([getattr(c, f) for c in curves], axis=0)
                            for f in ("success", "precision", "norm_precision")))


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A plain-text table, one row per tracker, values in percent."""
    columns = [("success_auc", "AUC"), ("precision", "P@20"), ("norm_precision", "Pnorm@.2"),
               ("ao", "AO"), ("sr_0.5", "SR.5"), ("sr_0.75", "SR.75")]
    columns = [(k, label) for k, label in columns if any(k in r for r in results.values())]
    width = max(10, *(len(t) for t in results))
    lines = [f"{'tracker':<{width}} " + " ".join(f"{label:>9}" for _, label in columns)]
    for tracker, r in results.items():
        lines.append(f"{tracker:<{width}} " + " ".join(
            f"{100 * r[k]:>9.2f}" if k in r else f"{'-':>9}" for k, _ in columns))
    return "\n".join(lines)


def write_report(folder: Path, summary: Mapping,
                 per_sequence: Sequence[tuple[str, SequenceCurves, int, float]]) -> None:
    """``metrics.json`` (the summary) and ``sequences.csv`` (name, AUC, P, P_norm, frames, fps).

    Raises:
        LoratError: the folder cannot be written (names it).
    """
    with _writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        with open(folder / "sequences.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sequence", "success_auc", "precision", "norm_precision", "frames", "fps"])
            for name, c, frames, fps in per_sequence:
                s = summarize_curves([c])
                w.writerow([name, f"{s['success_auc']:.4f}", f"{s['precision']:.4f}", f"{s['norm_precision']:.4f}",
                            frames, f"{fps:.2f}" if fps == fps else ""])


def plot_curves(folder: Path, curves: Mapping[str, SequenceCurves], title: str = "") -> list[Path]:
    """success.png, precision.png, norm_precision.png with one curve per tracker (AUC / value in the legend).

    Raises:
        LoratError: the folder cannot be written (names it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with _writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
    specs = [("success", SUCCESS_THRESHOLDS, "Overlap threshold", "Success rate", lambda c: c.mean(), "AUC"),
             ("precision", PRECISION_THRESHOLDS, "Location error threshold (px)", "Precision",
              lambda c: c[P20], "P@20"),
             ("norm_precision", NORM_PRECISION_THRESHOLDS, "Normalised location error threshold",
              "Normalised precision", lambda c: c[P_NORM_02], "P@0.2")]
    paths = []
    for field, x, xlabel, ylabel, score, label in specs:
        fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
        ranked = sorted(curves.items(), key=lambda kv: -score(getattr(kv[1], field)))
        for tracker, c in ranked:
            y = getattr(c, field)
            ax.plot(x, y, linewidth=2, label=f"{tracker} [{label} {100 * score(y):.1f}]")
        ax.set(xlabel=xlabel, ylabel=ylabel, ylim=(0, 1.02), xlim=(x[0], x[-1]),
               title=f"{ylabel}{' - ' + title if title else ''}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left" if field == "success" else "lower right", fontsize=8)
        fig.tight_layout()
        path = folder / f"{field}.png"
        try:
            with _writing(path):
                fig.savefig(path)
        finally:
            plt.close(fig)
        paths.append(path)
    return paths
