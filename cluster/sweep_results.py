"""A finished (or partly finished) sweep's outputs, from its trials' run directories.

``results.parquet`` / ``results.csv`` (one row per trial), ``ranking.md`` (best validation
accuracy per allocator and budget, each at its own best step size and perturbation
scale), ``best_config.yaml`` (ready for ``python -m jobs.train --config``), and the plots
``curves.png`` (validation accuracy against queries, every trial) and ``best.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
import yaml

from cluster.sweep_config import SweepConfig, trial_config
from fqa.config import Config, with_overrides
from fqa.storage import Remote, scratch_dir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _dig(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part, {}) if isinstance(data, dict) else {}
    return data if data != {} else None


OUTPUTS = (
    "results.parquet",
    "results.csv",
    "ranking.md",
    "best_config.yaml",
    "curves.png",
    "best.png",
)


def read_metrics(path: Path | Remote) -> list[dict]:
    """metrics.jsonl records, from a local path or object storage."""
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def trial_rows(result_grid, sweep: SweepConfig, sweep_dir: Path | Remote) -> list[dict[str, Any]]:
    """One row per trial: its sampled parameters, the config facts the ranking groups
    by, the best and final value of the sweep's metric (and the best validation accuracy),
    queries consumed, wall time and status."""
    metric, sign = sweep.metric, (1.0 if sweep.mode == "max" else -1.0)
    rows = []
    for result in result_grid:
        trial_id = Path(result.path).name
        run_dir = sweep_dir / "runs" / trial_id
        config_path = run_dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        records = (
            read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
        )
        scored = [r for r in records if metric in r]
        accuracies = [r["val_accuracy"] for r in records if "val_accuracy" in r]
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        steps = _dig(config, "train.steps")
        done = bool(records) and records[-1]["step"] + 1 == steps
        if result.error is not None:
            status = "ERROR"
        else:
            status = "TERMINATED" if done else "STOPPED"  # stopped early by the scheduler
        best = max(scored, key=lambda r: sign * r[metric]) if scored else {}
        estimator = _dig(config, "estimator.name")
        row = {
            "trial_id": trial_id,
            **{key: (result.config or {}).get(key) for key in sweep.space},
            "estimator": estimator,
            "allocator": _dig(config, "allocator.name"),
            "queries_per_datapoint": _dig(config, "train.queries_per_datapoint"),
            "lr": _dig(config, "train.lr"),
            "perturbation": _dig(
                config, "estimator.epsilon" if estimator == "spsa" else "estimator.sigma"
            ),
            "steps_planned": steps,
            "steps_done": records[-1]["step"] + 1 if records else 0,
            f"best_{metric}": best.get(metric),
            "best_at_queries": best.get("queries"),
            f"final_{metric}": scored[-1][metric] if scored else None,
            "best_val_accuracy": max(accuracies) if accuracies else None,
            "queries": records[-1]["queries"] if records else 0,
            "test_accuracy": summary.get("test_accuracy"),
            "wall_s": (result.metrics or {}).get("time_total_s"),
            "status": status,
            "error": str(result.error).splitlines()[0][:200] if result.error is not None else "",
        }
        rows.append(row)
    return rows


def ranking(table: pd.DataFrame, metric: str = "val_accuracy", mode: str = "max") -> pd.DataFrame:
    """The best value of the metric per (allocator, budget) over the other parameters
    (step size, perturbation scale, ...): each allocator and budget at its own best."""
    column = f"best_{metric}"
    scored = table.dropna(subset=[column])
    if scored.empty:
        return scored
    groups = scored.groupby(["allocator", "queries_per_datapoint"])[column]
    index = groups.idxmax() if mode == "max" else groups.idxmin()
    best = scored.loc[
        index,
        [
            "allocator",
            "queries_per_datapoint",
            column,
            "lr",
            "perturbation",
            "queries",
            "trial_id",
        ],
    ]
    # stable: ties keep trial order, so the winner of a tie is reproducible
    return best.sort_values(column, ascending=mode != "max", kind="stable").reset_index(drop=True)


def write_outputs(
    result_grid, sweep: SweepConfig, base: Config, sweep_dir: Path | Remote
) -> dict[str, Any]:
    """Write the outputs into sweep_dir; on object storage they are written to a local
    staging directory first (pandas and matplotlib want files) and then uploaded."""
    remote = isinstance(sweep_dir, Remote)
    out_dir = scratch_dir("fqa-sweep-") if remote else sweep_dir
    summary = _write(result_grid, sweep, base, sweep_dir, out_dir)
    if remote:
        for name in OUTPUTS:
            if (out_dir / name).is_file():
                (sweep_dir / name).upload(out_dir / name)
    return summary


def _write(result_grid, sweep, base, sweep_dir: Path | Remote, out_dir: Path) -> dict[str, Any]:
    rows = trial_rows(result_grid, sweep, sweep_dir)
    table = pd.DataFrame(rows)
    if rows:  # Tune lists restored trials in another order
        table = table.sort_values("trial_id").reset_index(drop=True)
    table.to_parquet(out_dir / "results.parquet", index=False)
    table.to_csv(out_dir / "results.csv", index=False)
    metric, column = sweep.metric, f"best_{sweep.metric}"
    ranked = ranking(table, metric, sweep.mode)
    (out_dir / "ranking.md").write_text(_markdown(ranked, metric) + "\n")
    out: dict[str, Any] = {
        "dir": str(sweep_dir),
        "trials": len(rows),
        "status": table["status"].value_counts().to_dict() if rows else {},
    }
    if not ranked.empty:
        winner = table.loc[table["trial_id"] == ranked.iloc[0]["trial_id"]].iloc[0]
        params = {key: winner[key] for key in sweep.space}
        best = trial_config(base, sweep, _python(params))
        best = with_overrides(best, {"run.name": f"{sweep.name}-best"})
        (out_dir / "best_config.yaml").write_text(
            f"# best trial {winner['trial_id']} of sweep {sweep.name}: "
            f"{metric} {winner[column]:.4f}\n"
            + yaml.safe_dump(best.model_dump(mode="json"), sort_keys=False)
        )
        out.update(
            best_trial=winner["trial_id"],
            **{column: float(winner[column])},
            best_params=_python(params),
        )
    plot_curves(table, sweep_dir, out_dir / "curves.png", sweep.name, metric)
    plot_best(ranked, out_dir / "best.png", sweep.name, metric)
    return out


def _python(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}


def _markdown(ranked: pd.DataFrame, metric: str) -> str:
    if ranked.empty:
        return "(no trial reached an evaluation)"
    lines = [
        f"| allocator | queries/datapoint | best {metric} | lr | σ/ε | queries | trial |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in ranked.itertuples():
        lines.append(
            f"| {r.allocator} | {r.queries_per_datapoint} | {getattr(r, f'best_{metric}'):.4f} | {r.lr:g} "
            f"| {r.perturbation:g} | {r.queries} | {r.trial_id} |"
        )
    return "\n".join(lines)


def _label(row: pd.Series) -> str:
    return f"{row['allocator']} q={row['queries_per_datapoint']} lr={row['lr']:g} σ/ε={row['perturbation']:g}"


def plot_curves(
    table: pd.DataFrame, sweep_dir: Path | Remote, out: Path, title: str, metric: str
) -> None:
    fig, ax = plt.subplots(figsize=(9, 5))
    for _, row in table.iterrows():
        path = sweep_dir / "runs" / row["trial_id"] / "metrics.jsonl"
        if not path.is_file():
            continue
        evals = [r for r in read_metrics(path) if metric in r]
        if evals:
            style = "-" if row["status"] == "TERMINATED" else ":"
            ax.plot([r["queries"] for r in evals], [r[metric] for r in evals], style,
                    marker="o", ms=3, label=f"{_label(row)} ({row['status'].lower()})")  # fmt: skip
    ax.set(
        xlabel="queries consumed",
        ylabel=f"{metric} (axis not from zero)",
        title=f"{title}: every trial",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_best(ranked: pd.DataFrame, out: Path, title: str, metric: str) -> None:
    column = f"best_{metric}"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if not ranked.empty:
        budgets = sorted(ranked["queries_per_datapoint"].unique())
        allocators = sorted(ranked["allocator"].unique())
        width = 0.8 / len(allocators)
        for i, allocator in enumerate(allocators):
            for j, budget in enumerate(budgets):
                hit = ranked[
                    (ranked["allocator"] == allocator) & (ranked["queries_per_datapoint"] == budget)
                ]
                if hit.empty:
                    continue
                r = hit.iloc[0]
                x = j + (i - (len(allocators) - 1) / 2) * width
                ax.bar(
                    x,
                    r[column],
                    width,
                    color=f"C{i}",
                    label=allocator if j == 0 else None,
                )
                ax.text(x, r[column], f"{r[column]:.3f}\nlr={r['lr']:g}",
                        ha="center", va="bottom", fontsize=7)  # fmt: skip
        ax.set_xticks(range(len(budgets)), [f"{b} q/datapoint" for b in budgets])
        high = float(ranked[column].max())
        # bars start at zero: a zoomed axis would make small differences look large
        ax.set_ylim(0.0, 1.05 if high <= 1.0 else None)
        ax.legend(title="allocator")
    ax.set(
        ylabel=f"best {metric} (one trial per bar, no error bars)",
        title=f"{title}: each at its best lr / σ",
    )
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
