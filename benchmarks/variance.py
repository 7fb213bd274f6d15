"""``python -m jobs.bench variance``: gradient-estimator error per allocator at equal budgets.

A partially trained ViT and a fixed batch. For every estimator, budget and
allocator, the error ‖ĝ − g‖² against the autograd batch gradient is averaged over
repetitions (the estimator is unbiased, so this is its variance). The oracle knows
the true per-datapoint v_i; the learned allocators see only statistics gathered on
earlier batches, by ordinary training steps (``Trainer.step()``) that also move the
model (docs/METHOD.md §4); the measurement then holds the model fixed. ``loss_curve`` and
``gaussian`` are the learned allocators as they are after the online learning steps (one
update per training step, as in training);
``gaussian_fit`` is the same allocator after further offline Adam passes over the
recorded history (the learning steps' batches, scored with the final statistics: no
query is spent and nothing of the evaluated batch's repetitions is seen). The hindsight
ceilings are the best allocation of a loss-only family computed with the true v_i of the
evaluated batch: ``ceiling_gaussian`` (the gaussian family fitted to them) and
``ceiling_monotone`` (the best allocation non-decreasing, or non-increasing, in loss).
``expected share`` is the share of the oracle's reduction in E Σ v_i/n_i computed from
the true v_i (no repetition noise). Standard
errors: of each mean error over repetitions, and of the share of the oracle's reduction
by bootstrap over repetitions. Writes variance.json and variance.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import add_common_arguments, save_figure, write_report
from fqa.allocators import Allocation, AllocationRequest, Allocator, create_allocator
from fqa.allocators.isotonic import isotonic
from fqa.allocators.rounding import round_to_budget, water_fill
from fqa.backprop import ensure_pretrained, train_backprop
from fqa.config import load_config, with_overrides
from fqa.plots import plt
from fqa.progress import Progress
from fqa.seeding import derive_seed
from fqa.stats import DatapointStats
from fqa.trainer import Trainer

ALLOCATORS = (
    "uniform",
    "bernoulli",
    "neyman",
    "gaussian",
    "gaussian_fit",
    "loss_curve",
    "ceiling_gaussian",
    "ceiling_monotone",
    "oracle",
)
# allocation overhead measured at B=64 on the main task: the learned allocators and,
# for scale, the cheap ones (their cost is the shared planning path alone)
OVERHEAD_ALLOCATORS = ("uniform", "neyman", "gaussian", "loss_curve")
HINDSIGHT_PASSES = 500  # Adam steps of ceiling_gaussian on the true variances


def _flat_grad(params) -> torch.Tensor:
    return torch.cat([p.grad.detach().flatten().double() for p in params])


def _estimate(trainer: Trainer, ids, counts, baselines, seed: int) -> torch.Tensor:
    shards = trainer.estimator.plan(
        ids, counts, baselines, seed, trainer.config.estimator.shard_rows
    )
    trainer.estimator.estimate(trainer.task, shards)
    return _flat_grad(trainer.params)


def _autograd(trainer: Trainer, ids) -> torch.Tensor:
    for p in trainer.params:
        p.grad = None
    with torch.enable_grad():
        trainer.task.backprop_loss(ids).backward()
    return _flat_grad(trainer.params)


def true_variances(trainer: Trainer, ids, baselines, samples: int) -> np.ndarray:
    """v_i = E‖ĝ_ik − g_i‖² per datapoint: SPSA (Rademacher directions) from (D−1)‖g_i‖², LR by Monte Carlo."""
    v = np.zeros(len(ids))
    for i, point in enumerate(ids):
        g_i = _autograd(trainer, np.array([point]))
        if trainer.config.estimator.name == "spsa":
            v[i] = (g_i.numel() - 1) * float(g_i @ g_i)
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


class RecordingAllocator:
    """Delegates to an allocator and keeps every request it is asked: the history that
    ``refit_gaussian`` replays."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.requests: list[AllocationRequest] = []

    def allocate(self, request: AllocationRequest):
        self.requests.append(request)
        return self.inner.allocate(request)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class _Hindsight(Allocator):
    """Benchmark-only: the best allocation of a loss-only family, given the true v_i."""

    needs_oracle = True

    def __init__(self, name: str, weights) -> None:
        self.name = name
        self.weights = weights  # request -> sqrt-variance weights for water-filling

    def allocate(self, request: AllocationRequest) -> Allocation:
        continuous = water_fill(self.weights(request), request.budget, request.n_min)
        rng = np.random.default_rng(request.seed)
        counts = round_to_budget(continuous, request.budget, request.n_min, rng)
        return Allocation(counts, continuous)


def monotone_ceiling_weights(request: AllocationRequest) -> np.ndarray:
    """sqrt of the isotonic regression of the true v on loss (the better direction):
    n ∝ this is the best allocation monotone in loss (fqa/allocators/isotonic.py)."""
    v, losses = np.asarray(request.oracle_variance), np.asarray(request.losses)
    order = np.argsort(losses, kind="stable")
    best, best_cost = None, np.inf
    for direction in (order, order[::-1]):
        pooled = np.empty(len(v))
        pooled[direction] = isotonic(v[direction])
        weights = np.sqrt(pooled)
        cost = float((v / water_fill(weights, request.budget, request.n_min)).sum())
        if cost < best_cost:
            best, best_cost = weights, cost
    return best


def gaussian_ceiling(request: AllocationRequest) -> Allocator:
    """The gaussian family's parameters fitted to the evaluated batch's true variances."""
    allocator = create_allocator("gaussian")
    for k in range(HINDSIGHT_PASSES):
        fit = replace(request, seed=2_000_000 + k)  # ξ draws apart from the reps' seeds
        allocator.update(fit, allocator.allocate(fit), np.asarray(request.oracle_variance))
    return allocator


def learn_allocators(
    trainer: Trainer, steps: int, progress: bool, shadows: dict[str, Allocator]
) -> tuple[DatapointStats, dict, float, list[AllocationRequest]]:
    """Gather statistics and fit the gaussian allocator with training steps
    (``Trainer.step()``, exactly as in training).

    ``shadows`` learn online from the same steps' statistics (their updates read only
    the measured second moments, not their own counts). Returns the statistics, the
    gaussian allocator's state, the allocation overhead (plan + learn time as a
    fraction of step time) and the steps' requests.
    """
    recorder = RecordingAllocator(trainer.planner.allocator)
    trainer.planner.allocator = recorder
    allocator_seconds, step_seconds = 0.0, 0.0
    with Progress(steps, "learn allocator", enabled=progress) as bar:
        for _ in range(steps):
            metrics = trainer.step()
            allocator_seconds += metrics["plan_seconds"] + metrics["learn_seconds"]
            step_seconds += metrics["step_seconds"]
            request = recorder.requests[-1]
            measured = trainer.stats.lookup(request.ids)[2] * trainer.variance_scale
            for shadow in shadows.values():
                shadow.update(request, shadow.allocate(request), measured)
            bar.update(1)
    trainer.planner.allocator = recorder.inner
    return (
        trainer.stats,
        trainer.allocator.state_dict(),
        allocator_seconds / max(step_seconds, 1e-12),
        recorder.requests,
    )


def measure_overheads(config, names, batch_size: int, steps: int) -> list[dict]:
    """Allocation overhead of each allocator in ``names`` in training steps at
    ``batch_size``: planning (statistics lookup, allocation, sharding) plus learning
    (statistics update, allocator update), as a fraction of the whole step (pre-pass,
    queries, optimizer). One trainer per allocator, stepped in turn, so a change of
    machine load falls on all of them alike."""
    trainers = {
        name: Trainer(
            with_overrides(
                config,
                {
                    "allocator.name": name,
                    "train.batch_size": batch_size,
                    "run.name": f"{config.run.name}-overhead-{name}",
                },
            )
        )
        for name in names
    }
    overhead = dict.fromkeys(names, 0.0)
    total = dict.fromkeys(names, 0.0)
    for step in range(steps):
        for name, trainer in trainers.items():
            metrics = trainer.step()
            if step >= 2:  # the first steps warm caches and grow the statistics arrays
                total[name] += metrics["step_seconds"]
                overhead[name] += metrics["plan_seconds"] + metrics.get("learn_seconds", 0.0)
    for trainer in trainers.values():
        trainer.close()
    return [
        {
            "allocator": name,
            "batch_size": batch_size,
            "steps": steps,
            "overhead": overhead[name] / max(total[name], 1e-12),
            "ms_per_step": 1000 * overhead[name] / max(steps - 2, 1),
            "step_ms": 1000 * total[name] / max(steps - 2, 1),
        }
        for name in names
    ]


def overhead_config(args, estimator: str):
    """The main task's config (``--config``) with ``estimator``, unchanged otherwise."""
    overrides = {
        "estimator.name": estimator,
        "train.progress": False,
        "run.resume": False,
        "run.out_dir": args.runs,
        "run.name": f"bench-variance-{estimator}",
    }
    if args.quick:
        overrides["pretrain.epochs"] = 1
    config = load_config(args.config, overrides)
    if not config.pretrain.enabled:  # random-init weights: a step costs the same
        return config
    return with_overrides(
        config, {"model.checkpoint": str(ensure_pretrained(config, not args.quick))}
    )


def refit_gaussian(
    state: dict, history: list[AllocationRequest], stats: DatapointStats, scale: float, passes: int
) -> dict:
    """More Adam steps of the gaussian allocator over the recorded batches, each scored
    with the final statistics (fresh ξ per pass): the warm-up a longer run would give."""
    allocator = create_allocator("gaussian")
    allocator.load_state_dict(state)
    for k in range(passes):
        for j, old in enumerate(history):
            request = replace(old, seed=derive_seed(old.seed, "allocation", k, j), variance=None)
            allocation = allocator.allocate(request)
            allocator.update(request, allocation, stats.lookup(request.ids)[2] * scale)
    return allocator.state_dict()


def _bootstrap_share(
    per_rep: dict[str, np.ndarray], name: str, rng: np.random.Generator, draws: int = 1000
) -> float:
    """Standard error of 1 − (e − e_oracle)/(e_uniform − e_oracle), resampling repetitions."""
    shares = []
    for _ in range(draws):
        means = {
            k: v[rng.integers(0, len(v), len(v))].mean()
            for k, v in per_rep.items()
            if k in (name, "uniform", "oracle")
        }
        gap = means["uniform"] - means["oracle"]
        if gap > 0:
            shares.append((means["uniform"] - means[name]) / gap)
    return float(np.std(shares)) if len(shares) > 1 else float("nan")


def run_one_estimator(args, estimator: str) -> dict:
    overrides = {
        "estimator.name": estimator,
        "estimator.antithetic": False,  # one query per sample: budgets of 2 leave room to allocate
        "trainable.mode": args.trainable,
        "allocator.name": "gaussian",
        "train.progress": False,
        "run.resume": False,
        "run.name": f"bench-variance-{estimator}",
        "run.out_dir": args.runs,
        "train.queries_per_datapoint": 4,
        "train.batch_size": args.batch_size,
        "train.steps": args.learn_steps,  # the learning steps are the run
        "train.eval_every": args.learn_steps,
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
    shadows = {"loss_curve": create_allocator("loss_curve")}
    stats, gaussian_state, overhead, history = learn_allocators(
        trainer, args.learn_steps, not args.quick, shadows
    )
    fitted_state = refit_gaussian(
        gaussian_state, history, stats, trainer.variance_scale, args.fit_passes
    )

    ids = trainer.sampler.batch(10_000)  # a batch the allocators have not been fitted on
    baselines = trainer.task.prepass(ids)["loss"]
    truth = _autograd(trainer, ids)
    v_true = true_variances(trainer, ids, baselines, 8 if args.quick else args.truth_samples)
    count, _, second = stats.lookup(ids)
    estimated = second * trainer.variance_scale
    gain_star = float(np.mean(v_true) / np.mean(np.sqrt(v_true)) ** 2)

    rows = []
    budgets = [int(b) for b in args.budgets.split(",")]
    rng = np.random.default_rng(0)
    cells = [(b, name) for b in budgets for name in ALLOCATORS]
    bar = Progress(len(cells), f"variance {estimator}", enabled=not args.quick, every=6)
    for budget in budgets:
        errors, per_reps, expected = {}, {}, {}
        template = AllocationRequest(
            ids=ids,
            losses=baselines,
            budget=budget * len(ids),
            n_min=1,
            seed=0,
            variance=estimated,
            observations=count,
            oracle_variance=v_true,
        )
        for name in ALLOCATORS:
            if name == "ceiling_gaussian":
                allocator = gaussian_ceiling(template)
            elif name == "ceiling_monotone":
                allocator = _Hindsight(name, monotone_ceiling_weights)
            elif name in shadows:
                allocator = shadows[name]
            else:
                allocator = create_allocator("gaussian" if name == "gaussian_fit" else name)
            if name in ("gaussian", "gaussian_fit"):
                allocator.load_state_dict(gaussian_state if name == "gaussian" else fitted_state)
            per_rep, sums = [], []
            for rep in range(args.reps):
                counts = allocator.allocate(replace(template, seed=rep)).counts
                estimate = _estimate(trainer, ids, counts, baselines, 1_000_000 + rep)
                per_rep.append(float(((estimate - truth) ** 2).sum()))
                sums.append(float((v_true / counts).sum()))
            per_reps[name] = np.asarray(per_rep)
            errors[name] = float(np.mean(per_rep))
            expected[name] = float(np.mean(sums))
            bar.update(1)
        uniform = errors["uniform"]
        oracle_reduction = 1 - errors["oracle"] / uniform
        for name in ALLOCATORS:
            reduction = 1 - errors[name] / uniform
            expected_gap = expected["uniform"] - expected["oracle"]
            rows.append(
                {
                    "estimator": estimator,
                    "budget": budget,
                    "allocator": name,
                    "error": errors[name],
                    "error_se": float(per_reps[name].std(ddof=1) / np.sqrt(len(per_reps[name]))),
                    "relative_to_uniform": errors[name] / uniform,
                    "share_se": _bootstrap_share(per_reps, name, rng),
                    "share_of_oracle_reduction": reduction / oracle_reduction
                    if oracle_reduction > 0
                    else float("nan"),
                    "expected_share": (expected["uniform"] - expected[name]) / expected_gap
                    if expected_gap > 0
                    else float("nan"),
                }
            )
    bar.close()
    overheads = measure_overheads(
        overhead_config(args, estimator),
        OVERHEAD_ALLOCATORS,
        args.overhead_batch,
        args.overhead_steps,
    )
    return {
        "estimator": estimator,
        "gain_star": gain_star,
        "gaussian_params": {"online": gaussian_state["phi"], "fitted": fitted_state["phi"]},
        "allocation_overhead": overhead,
        "overhead": overheads,
        "rows": rows,
        "batch_size": len(ids),
        "trainable": args.trainable,
        "reps": args.reps,
        "learn_steps": args.learn_steps,
        "fit_passes": args.fit_passes,
    }


def run(args) -> dict:
    if args.quick:
        args.budgets, args.reps, args.learn_steps, args.fit_passes = "2,4", 3, 6, 1
        args.overhead_batch, args.overhead_steps = 8, 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    estimators = ["lr", "spsa"] if args.estimator == "both" else [args.estimator]
    started = time.perf_counter()
    if args.overhead_only:  # the overhead paragraph of docs/RESULTS.md, in minutes
        rows = []
        for name in estimators:
            config = overhead_config(args, name)
            for row in measure_overheads(
                config, OVERHEAD_ALLOCATORS, args.overhead_batch, args.overhead_steps
            ):
                rows.append({**row, "estimator": name})
        report = {"overhead": rows}
        report["wall_seconds"] = time.perf_counter() - started
        Path(args.out, "variance_overhead.json").write_text(json.dumps(report, indent=1))
        print("\n".join(_overhead_lines(report["overhead"])))
        return report
    report = {"results": [run_one_estimator(args, name) for name in estimators]}
    report["wall_seconds"] = time.perf_counter() - started
    write_report(args.out, "variance", report, _plot)
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
        lines.extend(_overhead_lines(result.get("overhead", [])))
        lines.append(
            f"  {'budget':>6} {'allocator':<16} {'error ± se':>20} {'vs uniform':>10} "
            f"{'of oracle gain ± se':>20} {'expected':>9}"
        )
        for row in result["rows"]:
            lines.append(
                f"  {row['budget']:>6} {row['allocator']:<16} {row['error']:>10.4g} ± "
                f"{row['error_se']:<7.2g} {row['relative_to_uniform']:>10.3f} "
                f"{row['share_of_oracle_reduction']:>12.2f} ± {row['share_se']:.2f} "
                f"{row.get('expected_share', float('nan')):>9.3f}"
            )
    return "\n".join(lines)


def _overhead_lines(rows: list[dict]) -> list[str]:
    return [
        f"  overhead {row.get('estimator', '')} {row['allocator']:<10} at B={row['batch_size']}: "
        f"{100 * row['overhead']:.2f}% of step time ({row['ms_per_step']:.2f} ms of "
        f"{row['step_ms']:.0f} ms/step)"
        for row in rows
    ]


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
    save_figure(fig, path)


def add_arguments(parser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--estimator", default="both", choices=["lr", "spsa", "both"])
    parser.add_argument(
        "--trainable", default="last_blocks", choices=["head", "last_blocks", "lora", "full"]
    )
    parser.add_argument(
        "--budgets", default="2,4,8,16", help="samples per datapoint, comma separated"
    )
    parser.add_argument("--reps", type=int, default=20, help="repetitions per cell")
    parser.add_argument("--batch-size", type=int, default=16, help="the fixed batch's size")
    parser.add_argument(
        "--learn-steps", type=int, default=100, help="steps to learn allocator parameters"
    )
    parser.add_argument(
        "--fit-passes",
        type=int,
        default=10,
        help="offline passes for gaussian_fit over the history",
    )
    parser.add_argument(
        "--truth-samples",
        type=int,
        default=32,
        help="lr: Monte Carlo samples per datapoint for v_i",
    )
    parser.add_argument(
        "--overhead-batch", type=int, default=64, help="batch size of the overhead measurement"
    )
    parser.add_argument(
        "--overhead-steps", type=int, default=30, help="training steps per overhead measurement"
    )
    parser.add_argument(
        "--overhead-only",
        action="store_true",
        help="only the allocation overhead at --overhead-batch (writes variance_overhead.json)",
    )
