"""The reporter: PNG plots of runs (loss and accuracy against queries consumed), drawn
from their metrics.jsonl by the entrypoints; the trainer only writes metrics."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def plot_run(metrics_path: Path, out: Path, title: str = "") -> Path | None:
    return plot_runs({title or "run": metrics_path}, out, title)


def draw_run(run_dir: str | Path) -> Path | None:
    """``curves.png`` of one run directory, from its ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    return plot_run(run_dir / "metrics.jsonl", run_dir / "curves.png", title=run_dir.name)


def plot_runs(runs: dict[str, Path], out: Path, title: str = "") -> Path | None:
    """One line per run: smoothed training loss and validation accuracy against queries."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for label, path in runs.items():
        if not Path(path).exists():
            continue
        records = read_metrics(path)
        if not records:
            continue
        drawn = True
        queries = [r["queries"] for r in records]
        loss = [r["loss"] for r in records]
        window = max(1, len(loss) // 30)
        smooth = [
            sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1])
            for i in range(len(loss))
        ]
        ax_loss.plot(queries, smooth, label=label)
        evals = [r for r in records if "val_accuracy" in r]
        ax_acc.plot(
            [r["queries"] for r in evals],
            [r["val_accuracy"] for r in evals],
            marker="o",
            ms=3,
            label=label,
        )
    if not drawn:
        plt.close(fig)
        return None
    ax_loss.set(xlabel="queries consumed", ylabel="training loss (pre-pass, smoothed)")
    ax_acc.set(xlabel="queries consumed", ylabel="validation accuracy", ylim=(0.0, 1.0))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
