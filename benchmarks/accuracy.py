"""``python -m jobs.bench accuracy``: test accuracy against queries consumed, equal budgets.

Digits fine-tuning of a tiny pretrained ViT in two regimes (a small trainable set: the
last block + head; full fine-tuning). Every run of a regime gets the same *total* query
budget (pre-pass included), so fewer queries per datapoint (q) buy more steps:

* ``backprop`` — the reference, each step counted as B·3 forward equivalents;
* ``spsa`` with uniform queries (q=2 is MeZO: one central difference per datapoint);
* ``lr`` with uniform queries at q = 1, 2, 4, 8 (one query per sample: not antithetic);
* ``lr`` and ``spsa`` with each allocator at q = 4.

Every configuration runs with the same seeds (batches, noise and evaluation points are
pure functions of the seed). The table gives the mean and spread (standard deviation
over seeds) of the final test accuracy and the queries the seed-mean curve needs to
reach a fixed accuracy — the best uniform ``lr`` run's final mean accuracy — with the
ratio to that run's own queries. Writes accuracy.json and accuracy.png.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import add_common_arguments, save_figure, write_report
from fqa.plots import plt
from fqa.progress import progress
from fqa.tasks.models import TINY_VIT

REGIMES = {
    "last_block": {"trainable.mode": "last_blocks", "trainable.blocks": 1, "train.lr": 0.002},
    "full": {"trainable.mode": "full", "train.lr": 0.001},
}
ALLOCATORS = ("neyman", "gaussian", "bernoulli")
LR_UNIFORM = (1, 2, 4, 8)
SPSA_UNIFORM = (2, 4)
ALLOCATED_Q = 4
EVALUATIONS = 8  # evaluation points per run, evenly spaced in queries


def method_grid() -> list[tuple[str, str, int]]:
    """(estimator, allocator, queries per datapoint) of every run of a regime and seed."""
    grid = [("backprop", "-", 3)]
    grid += [("spsa", "uniform", q) for q in SPSA_UNIFORM]
    grid += [("lr", "uniform", q) for q in LR_UNIFORM]
    grid += [(est, a, ALLOCATED_Q) for est in ("lr", "spsa") for a in ALLOCATORS]
    return grid


def _label(estimator: str, allocator: str, q: int) -> str:
    return "backprop" if estimator == "backprop" else f"{estimator}/{allocator} q={q}"


def _run(job: dict[str, Any]) -> dict[str, Any]:
    """One run in a worker process: its test-accuracy curve against queries consumed."""
    import torch

    torch.set_num_threads(1)  # runs share the cores
    from fqa.backprop import BackpropReference
    from fqa.config import load_config
    from fqa.trainer import Trainer

    estimator, allocator, q = job["estimator"], job["allocator"], job["q"]
    batch = job["batch_size"]
    per_step = batch * (3 if estimator == "backprop" else 1 + q)  # pre-pass + q queries
    steps = max(1, job["total_queries"] // per_step)
    eval_at = sorted({max(1, round(steps * k / EVALUATIONS)) for k in range(1, EVALUATIONS + 1)})
    config = load_config(
        job["config"],
        {
            **job["overrides"],
            "estimator.name": "lr" if estimator == "backprop" else estimator,
            "estimator.antithetic": False,
            "allocator.name": "uniform" if estimator == "backprop" else allocator,
            "train.queries_per_datapoint": q,
            "train.batch_size": batch,
            "train.steps": steps,
            "train.progress": False,
            "run.seed": job["seed"],
            "run.resume": False,
            "run.name": "bench-accuracy",
        },
    )
    started = time.perf_counter()
    # one loop for every method: the reference steps like the trainer does
    runner = BackpropReference(config) if estimator == "backprop" else Trainer(config)
    curve = []
    for _ in range(steps):
        runner.step()
        if runner.global_step in eval_at:
            curve.append((runner.queries, runner.task.evaluate("test")["accuracy"]))
    return {
        **{k: job[k] for k in ("regime", "estimator", "allocator", "q", "seed")},
        "steps": steps,
        "queries": [c[0] for c in curve],
        "test_accuracy": [c[1] for c in curve],
        "seconds": time.perf_counter() - started,
    }


def run(args) -> dict[str, Any]:
    from fqa.backprop import ensure_pretrained
    from fqa.config import load_config

    if args.quick:
        args.total_queries, args.seeds, args.batch_size, args.pretrain_epochs = 1200, 1, 16, 1
    base = {
        "model.kwargs": TINY_VIT,
        "pretrain.epochs": args.pretrain_epochs,
        "run.out_dir": args.runs,
    }
    started = time.perf_counter()
    checkpoint = ensure_pretrained(load_config(args.config, base), progress=not args.quick)
    base.update({"model.checkpoint": str(checkpoint), "pretrain.enabled": False})
    regimes = args.regimes.split(",")
    jobs = [
        {
            "config": args.config,
            "overrides": {**base, **REGIMES[regime]},
            "regime": regime,
            "estimator": estimator,
            "allocator": allocator,
            "q": q,
            "seed": seed,
            "batch_size": args.batch_size,
            "total_queries": args.total_queries,
        }
        for regime in regimes
        for seed in range(args.seeds)
        for estimator, allocator, q in method_grid()
    ]
    jobs.sort(key=lambda j: j["estimator"] != "lr")  # slowest first: the pool ends together
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        runs = list(
            progress(pool.map(_run, jobs), len(jobs), "accuracy runs", enabled=not args.quick, every=4)
        )
    table = [row for regime in regimes for row in regime_table(regime, runs)]
    report = {
        "total_queries": args.total_queries,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "model": TINY_VIT,
        "regimes": {r: REGIMES[r] for r in regimes},
        "wall_seconds": time.perf_counter() - started,
        "table": table,
        "runs": runs,
    }
    write_report(args.out, "accuracy", report, _plot)
    print(format_table(table))
    return report


def mean_curve(runs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Seed-mean test accuracy at the shared evaluation points (same config: same points)."""
    queries = np.asarray(runs[0]["queries"], dtype=float)
    return queries, np.mean([r["test_accuracy"] for r in runs], axis=0)


def queries_to(runs: list[dict], target: float) -> float:
    queries, acc = mean_curve(runs)
    hit = np.flatnonzero(acc >= target - 1e-9)
    return float(queries[hit[0]]) if len(hit) else float("inf")


def regime_table(regime: str, runs: list[dict]) -> list[dict]:
    mine = [r for r in runs if r["regime"] == regime]
    groups: dict[tuple, list[dict]] = {}
    for run in mine:
        groups.setdefault((run["estimator"], run["allocator"], run["q"]), []).append(run)
    finals = {k: np.array([r["test_accuracy"][-1] for r in g]) for k, g in groups.items()}
    uniform = [k for k in groups if k[0] == "lr" and k[1] == "uniform"]
    best = max(uniform, key=lambda k: finals[k].mean())
    target = float(finals[best].mean())
    base = queries_to(groups[best], target)
    rows = []
    for key, group in sorted(groups.items()):
        needed = queries_to(group, target)
        rows.append(
            {
                "regime": regime,
                "method": _label(*key),
                "estimator": key[0],
                "allocator": key[1],
                "q": key[2],
                "steps": group[0]["steps"],
                "final_mean": float(finals[key].mean()),
                "final_std": float(finals[key].std(ddof=1)) if len(group) > 1 else float("nan"),
                "target": target,
                "best_uniform": _label(*best),
                "queries_to_target": needed,
                "ratio_to_best_uniform": needed / base,
            }
        )
    return rows


def format_table(table: list[dict]) -> str:
    lines = [
        f"{'regime':<11} {'method':<22} {'steps':>5} {'final test acc':>15} "
        f"{'queries→target':>14} {'ratio':>6}"
    ]
    for row in table:
        lines.append(
            f"{row['regime']:<11} {row['method']:<22} {row['steps']:>5} "
            f"{row['final_mean']:>8.3f} ±{row['final_std']:>5.3f} {row['queries_to_target']:>14.0f} "
            f"{row['ratio_to_best_uniform']:>6.2f}"
        )
    for regime in dict.fromkeys(r["regime"] for r in table):
        first = next(r for r in table if r["regime"] == regime)
        lines.append(
            f"{regime}: target {first['target']:.3f} = final mean of {first['best_uniform']}"
        )
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    regimes = list(report["regimes"])
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.5 * len(regimes), 4.5), squeeze=False)
    for ax, regime in zip(axes[0], regimes, strict=True):
        groups: dict[tuple, list[dict]] = {}
        for run in report["runs"]:
            if run["regime"] == regime:
                groups.setdefault((run["estimator"], run["allocator"], run["q"]), []).append(run)
        for (estimator, allocator, q), group in sorted(groups.items()):
            queries, acc = mean_curve(group)
            # the spread over seeds (standard deviation); none with a single seed
            spread = np.std([r["test_accuracy"] for r in group], axis=0, ddof=1) if len(group) > 1 else None
            style = "k-" if estimator == "backprop" else ("-" if allocator == "uniform" else "--")
            ax.errorbar(queries, acc, yerr=spread, fmt=style, marker="o", ms=2.5, capsize=2,
                        label=_label(estimator, allocator, q))  # fmt: skip
        ax.set_ylim(0.0, 1.0)
        ax.set(
            title=f"{regime}: mean ± sd of {report['seeds']} seeds",
            xlabel="queries consumed (backprop: forward equivalents)",
            ylabel="test accuracy",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


def add_arguments(parser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--regimes", default="last_block,full", help="comma separated")
    parser.add_argument("--total-queries", type=int, default=24_000, help="per run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel")
