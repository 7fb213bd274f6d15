"""``fqa bench variance``: gradient-estimator error per allocator at equal budgets.

A fixed, partially trained ViT and a fixed batch. For every estimator, budget and
allocator, the error ‖ĝ − g‖² against the autograd batch gradient is averaged over
repetitions (the estimator is unbiased, so this is its variance). The oracle knows
the true per-datapoint v_i; the learned allocators see only statistics gathered on
earlier batches (METHOD.md §4). Writes variance.json and variance.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fqa.allocators import AllocationRequest, create_allocator
from fqa.backprop import ensure_pretrained, train_backprop
from fqa.config import load_config, with_overrides
from fqa.plots import plt
from fqa.stats import DatapointStats
from fqa.trainer import Trainer

ALLOCATORS = ("uniform", "bernoulli", "neyman", "gaussian", "oracle")


def _flat_grad(params) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten().double() for p in params])


def _estimate(trainer: Trainer, ids, counts, baselines, seed: int) -> torch.Tensor:
    shards = trainer.estimator.plan(
        ids, counts, baselines, seed, trainer.config.estimator.shard_rows
    )
    results = [trainer.estimator.evaluate(trainer.task, s) for s in shards]
    trainer.estimator.write_grad(trainer.task, shards, results)
    return _flat_grad(trainer.params)


def _autograd(trainer: Trainer, ids) -> torch.Tensor:
    for p in trainer.params:
        p.grad = None
    with torch.enable_grad():
        trainer.task.backprop_loss(ids).backward()
    return _flat_grad(trainer.params)


def true_variances(trainer: Trainer, ids, baselines, samples: int) -> np.ndarray:
    """v_i = E‖ĝ_ik − g_i‖² per datapoint: SPSA from (D+1)‖g_i‖², LR by Monte Carlo."""
    v = np.zeros(len(ids))
    for i, point in enumerate(ids):
        g_i = _autograd(trainer, np.array([point]))
        if trainer.config.estimator.name == "spsa":
            v[i] = (g_i.numel() + 1) * float(g_i @ g_i)
            continue
        errors = [
            float(
                (
                    (
                        _estimate(
                            trainer,
                            np.array([point]),
                            np.array([1]),
                            baselines[i : i + 1],
                            10_000 + k,
                        )
                        - g_i
                    )
                    ** 2
                ).sum()
            )
            for k in range(samples)
        ]
        v[i] = np.mean(errors)
    return v


def learn_allocators(
    trainer: Trainer, steps: int, progress: bool
) -> tuple[DatapointStats, dict, float]:
    """Gather statistics and fit the gaussian allocator on other batches of the fixed model.

    Returns the statistics, the gaussian allocator's state and the allocation overhead
    (allocate + learn time as a fraction of step time).
    """
    allocator_seconds, step_seconds = 0.0, 0.0
    for step in tqdm(range(steps), disable=not progress, desc="learn allocator"):
        started = time.perf_counter()
        plan = trainer.plan_step(step)
        results = trainer.evaluate_shards(plan)
        learn_started = time.perf_counter()
        trainer.planner.learn(plan.planned, results)
        allocator_seconds += plan.planned.seconds + time.perf_counter() - learn_started
        step_seconds += time.perf_counter() - started
    return (
        trainer.stats,
        trainer.allocator.state_dict(),
        allocator_seconds / max(step_seconds, 1e-12),
    )


def run_one_estimator(args, estimator: str) -> dict:
    overrides = {
        "estimator.name": estimator,
        "estimator.antithetic": False,  # one query per sample: budgets of 2 leave room to allocate
        "trainable.mode": args.trainable,
        "allocator.name": "gaussian",
        "train.progress": False,
        "run.resume": False,
        "run.name": f"bench-variance-{estimator}",
        "run.out_dir": str(Path(args.out) / "runs"),
        "train.queries_per_datapoint": 4,
    }
    if args.quick:
        overrides.update({"train.batch_size": 8, "pretrain.epochs": 1})
    config = load_config(args.config, overrides)
    config = with_overrides(
        config, {"model.checkpoint": str(ensure_pretrained(config, not args.quick))}
    )
    trainer = Trainer(config)
    # "partially trained": a few backpropagation steps so per-datapoint gradients differ
    train_backprop(trainer.task, config, 5 if args.quick else 60, progress=False)
    stats, gaussian_state, overhead = learn_allocators(trainer, args.learn_steps, not args.quick)

    ids = trainer.sampler.batch(10_000)  # a batch the allocators have not been fitted on
    baselines = trainer.task.prepass(ids)["loss"]
    truth = _autograd(trainer, ids)
    v_true = true_variances(trainer, ids, baselines, 8 if args.quick else 48)
    count, _, second = stats.lookup(ids)
    estimated = second * trainer.variance_scale
    gain_star = float(np.mean(v_true) / np.mean(np.sqrt(v_true)) ** 2)

    rows = []
    budgets = [int(b) for b in args.budgets.split(",")]
    for budget in budgets:
        errors = {}
        for name in ALLOCATORS:
            allocator = create_allocator(name)
            if name == "gaussian":
                allocator.load_state_dict(gaussian_state)
            per_rep = []
            for rep in range(args.reps):
                request = AllocationRequest(
                    ids=ids,
                    losses=baselines,
                    budget=budget * len(ids),
                    n_min=1,
                    seed=rep,
                    variance=estimated,
                    observations=count,
                    oracle_variance=v_true,
                )
                counts = allocator.allocate(request).counts
                estimate = _estimate(trainer, ids, counts, baselines, 1_000_000 + rep)
                per_rep.append(float(((estimate - truth) ** 2).sum()))
            errors[name] = float(np.mean(per_rep))
        uniform = errors["uniform"]
        oracle_reduction = 1 - errors["oracle"] / uniform
        for name in ALLOCATORS:
            reduction = 1 - errors[name] / uniform
            rows.append(
                {
                    "estimator": estimator,
                    "budget": budget,
                    "allocator": name,
                    "error": errors[name],
                    "relative_to_uniform": errors[name] / uniform,
                    "share_of_oracle_reduction": reduction / oracle_reduction
                    if oracle_reduction > 0
                    else float("nan"),
                }
            )
    return {
        "estimator": estimator,
        "gain_star": gain_star,
        "allocation_overhead": overhead,
        "rows": rows,
        "batch_size": len(ids),
        "trainable": args.trainable,
        "reps": args.reps,
    }


def run_variance_bench(args) -> dict:
    if args.quick:
        args.budgets, args.reps, args.learn_steps = "2,4", 3, 6
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    estimators = ["lr", "spsa"] if args.estimator == "both" else [args.estimator]
    report = {"results": [run_one_estimator(args, name) for name in estimators]}
    (out / "variance.json").write_text(json.dumps(report, indent=1))
    _plot(report, out / "variance.png")
    print(format_report(report))
    return report


def format_report(report: dict) -> str:
    lines = []
    for result in report["results"]:
        lines.append(
            f"estimator {result['estimator']} ({result['trainable']}, B={result['batch_size']}, "
            f"{result['reps']} reps): theoretical Neyman gain G* = {result['gain_star']:.2f}; "
            f"allocation overhead {100 * result['allocation_overhead']:.2f}% of step time"
        )
        lines.append(
            f"  {'budget':>6} {'allocator':<10} {'error':>11} {'vs uniform':>10} {'of oracle gain':>15}"
        )
        for row in result["rows"]:
            lines.append(
                f"  {row['budget']:>6} {row['allocator']:<10} {row['error']:>11.4g} "
                f"{row['relative_to_uniform']:>10.3f} {row['share_of_oracle_reduction']:>15.2f}"
            )
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    results = report["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        for name in ALLOCATORS:
            rows = [r for r in result["rows"] if r["allocator"] == name]
            ax.plot([r["budget"] for r in rows], [r["error"] for r in rows], marker="o", label=name)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="queries per datapoint",
            ylabel="E‖ĝ − g‖²",
            title=f"{result['estimator']} ({result['trainable']})",
        )
        budgets = sorted({r["budget"] for r in result["rows"]})
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
