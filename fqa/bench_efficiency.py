"""``fqa bench efficiency``: queries to reach the best uniform run's accuracy, per regime.

For each regime (trainable set x estimator) every run gets the same *total* query
budget; a run with fewer queries per datapoint takes more steps. The target is the
best uniform budget's final validation accuracy (mean of its last evaluations); each
run reports the queries it needed to first reach that target (smoothed over
neighbouring evaluations) and the ratio to the best uniform run's queries.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from fqa.plots import plt, read_metrics

REGIMES = {
    # name: (overrides, uniform budgets, allocator budgets) in queries per datapoint
    "head/lr": (
        {"trainable.mode": "head", "estimator.name": "lr", "train.lr": 0.01},
        [2, 4, 8],
        [4],
    ),
    "last_block/lr": (
        {"trainable.mode": "last_blocks", "estimator.name": "lr", "train.lr": 0.002},
        [2, 4, 8],
        [4],
    ),
}
ALLOCATORS = ("gaussian", "neyman")


def _run(job: tuple[str, str, int, dict, str, int, int]) -> dict:
    import torch

    torch.set_num_threads(1)  # two runs share the two cores
    from fqa.config import load_config
    from fqa.trainer import Trainer

    regime, allocator, q, overrides, config_path, total, seed = job
    steps = max(1, total // (64 * (1 + q)))  # pre-pass + q perturbed queries per datapoint
    name = f"eff-{regime.replace('/', '-')}-{allocator}-q{q}-s{seed}"
    config = load_config(
        config_path,
        {
            **overrides,
            "allocator.name": allocator,
            "train.queries_per_datapoint": q,
            "train.steps": steps,
            "train.eval_every": max(1, steps // 12),
            "train.progress": False,
            "run.name": name,
            "run.seed": seed,
            "run.resume": False,
            "compare.backprop": False,
            "compare.allocators": [],
            "train.batch_size": 64,
        },
    )
    summary = Trainer(config).fit()
    return {
        "regime": regime,
        "allocator": allocator,
        "q": q,
        "seed": seed,
        "steps": steps,
        "metrics": str(Path(config.run.out_dir) / name / "metrics.jsonl"),
        **summary,
    }


def _smoothed_curve(path: str) -> tuple[np.ndarray, np.ndarray]:
    evals = [r for r in read_metrics(Path(path)) if "val_accuracy" in r]
    queries = np.array([r["queries"] for r in evals], dtype=float)
    acc = np.array([r["val_accuracy"] for r in evals])
    smooth = np.convolve(np.pad(acc, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    return queries, smooth


def run_efficiency_bench(args) -> dict:
    from fqa.backprop import ensure_pretrained
    from fqa.config import load_config

    checkpoint = ensure_pretrained(load_config(args.config), progress=True)  # once, before the pool
    jobs = []
    for regime, (regime_overrides, uniform_qs, alloc_qs) in REGIMES.items():
        overrides = {
            **regime_overrides,
            "model.checkpoint": str(checkpoint),
            "pretrain.enabled": False,
        }
        for seed in range(args.seeds):
            jobs += [
                (regime, "uniform", q, overrides, args.config, args.total_queries, seed)
                for q in uniform_qs
            ]
            jobs += [
                (regime, a, q, overrides, args.config, args.total_queries, seed)
                for a in ALLOCATORS
                for q in alloc_qs
            ]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        runs = list(pool.map(_run, jobs))

    table = []
    for regime in REGIMES:
        table += _regime_table(regime, [r for r in runs if r["regime"] == regime])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "total_queries": args.total_queries,
        "seeds": args.seeds,
        "table": table,
        "runs": [{k: v for k, v in r.items()} for r in runs],
    }
    (out / "efficiency.json").write_text(json.dumps(report, indent=1))
    _plot(runs, out / "efficiency.png")
    print(format_table(table))
    return report


def _matching(runs: list[dict], allocator: str, q: int) -> list[dict]:
    return [r for r in runs if (r["allocator"], r["q"]) == (allocator, q)]


def _final(runs: list[dict], allocator: str, q: int) -> float:
    """Mean of the last three smoothed evaluations, averaged over seeds."""
    return float(
        np.mean(
            [_smoothed_curve(r["metrics"])[1][-3:].mean() for r in _matching(runs, allocator, q)]
        )
    )


def _queries_to(runs: list[dict], allocator: str, q: int, target: float) -> float:
    needed = []
    for run in _matching(runs, allocator, q):
        queries, smooth = _smoothed_curve(run["metrics"])
        hit = np.flatnonzero(smooth >= target - 1e-9)
        needed.append(float(queries[hit[0]]) if len(hit) else float("inf"))
    return float(np.mean(needed))


def _regime_table(regime: str, runs: list[dict]) -> list[dict]:
    uniform_qs = sorted({r["q"] for r in runs if r["allocator"] == "uniform"})
    best_q = max(uniform_qs, key=lambda q: _final(runs, "uniform", q))
    target = _final(runs, "uniform", best_q)
    base = _queries_to(runs, "uniform", best_q, target)
    rows = []
    for allocator, q in sorted({(r["allocator"], r["q"]) for r in runs}):
        needed = _queries_to(runs, allocator, q, target)
        rows.append(
            {
                "regime": regime,
                "allocator": allocator,
                "q": q,
                "final_val_accuracy": _final(runs, allocator, q),
                "target": target,
                "best_uniform_q": best_q,
                "queries_to_target": needed,
                "ratio_to_best_uniform": needed / base if np.isfinite(needed) else float("inf"),
                "test_accuracy": float(
                    np.mean([r["test_accuracy"] for r in _matching(runs, allocator, q)])
                ),
            }
        )
    return rows


def format_table(table: list[dict]) -> str:
    lines = [
        f"{'regime':<15} {'allocator':<9} {'q':>3} {'final val':>9} {'test':>6} {'queries→target':>15} {'ratio':>6}"
    ]
    for row in table:
        lines.append(
            f"{row['regime']:<15} {row['allocator']:<9} {row['q']:>3} {row['final_val_accuracy']:>9.3f} "
            f"{row['test_accuracy']:>6.3f} {row['queries_to_target']:>15.0f} {row['ratio_to_best_uniform']:>6.2f}"
        )
    return "\n".join(lines)


def _plot(runs: list[dict], path: Path) -> None:
    regimes = list(dict.fromkeys(r["regime"] for r in runs))
    fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4), squeeze=False)
    for ax, regime in zip(axes[0], regimes, strict=True):
        for run in [r for r in runs if r["regime"] == regime and r["seed"] == 0]:
            queries, smooth = _smoothed_curve(run["metrics"])
            style = "-" if run["allocator"] == "uniform" else "--"
            ax.plot(queries, smooth, style, label=f"{run['allocator']} q={run['q']}")
        ax.set(title=regime, xlabel="queries consumed", ylabel="validation accuracy (smoothed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
