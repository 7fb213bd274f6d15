"""The main job: pretrain (cached) -> forward-only fine-tuning -> the same budget with
other allocators -> a backpropagation reference, then one comparison table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fqa.backprop import train_backprop, with_pretrained
from fqa.config import Config, with_overrides
from fqa.plots import plot_runs, read_metrics
from fqa.setup import build_task
from fqa.trainer import Trainer


def run_experiment(
    config: Config, trainer_factory: Callable[[Config], Trainer] = Trainer
) -> dict[str, Any]:
    """``trainer_factory`` builds the main run's trainer (the cluster layer passes its
    ``ClusterTrainer``); the comparison runs always use the single-process ``Trainer``."""
    progress = config.train.progress
    config = with_pretrained(config)

    trainer = trainer_factory(config)
    metric = trainer.primary_metric  # the task's headline metric
    results = [trainer.fit()]  # its summary carries every test metric
    trainer.storage.plot(config.run.name)
    notes = []
    if config.task.name.startswith("clip_"):
        # the untuned starting point: what forward-only training has to improve on
        start = build_task(config)
        results.insert(0, _initial_row(config, start))
        if hasattr(start, "query_cost"):
            cost = start.query_cost()
            notes.append(
                f"per-query cost: {cost['cached'] * 1e3:.3f} ms with cached image features, "
                f"{cost['uncached'] * 1e3:.3f} ms uncached"
            )
    curves = {f"{config.estimator.name}/{config.allocator.name}": _metrics(config)}
    for allocator in config.compare.allocators:
        if allocator == config.allocator.name:
            continue
        other = with_overrides(
            config,
            {
                "allocator.name": allocator,
                "allocator.kwargs": {},
                "run.name": f"{config.run.name}-{allocator}",
            },
        )
        other_trainer = Trainer(other)
        results.append(other_trainer.fit())
        other_trainer.storage.plot(other.run.name)
        curves[f"{config.estimator.name}/{allocator}"] = _metrics(other)
    if config.compare.backprop:
        steps = config.compare.backprop_steps or config.train.steps
        task = build_task(config)
        results.append(train_backprop(task, config, steps, progress, f"{config.run.name}-backprop"))

    out = Path(config.run.out_dir) / config.run.name
    notes += reach_notes(config, metric)
    notes += backprop_notes(results, metric)
    table = format_table(results, metric) + "".join(f"\n{line}" for line in notes)
    (out / "comparison.json").write_text(json.dumps(results, indent=1))
    (out / "comparison.txt").write_text(table + "\n")
    plot_runs(curves, out / "comparison.png", title=f"{config.run.name}: forward-only fine-tuning")
    return {"runs": results, "table": table, "dir": str(out)}


def _metrics(config: Config) -> Path:
    return Path(config.run.out_dir) / config.run.name / "metrics.jsonl"


def format_table(results: list[dict[str, Any]], metric: str = "accuracy") -> str:
    header = "test acc" if metric == "accuracy" else f"test {metric}"
    extra = metric != "accuracy" and all(f"test_{metric}" in r for r in results)
    lines = [
        f"{'run':<28} {'estimator':<9} {'allocator':<9} {'steps':>6} {'queries':>10} {'test acc':>9}"
        + (f" {header:>12}" if extra else "")
    ]
    for r in results:
        lines.append(
            f"{r['run']:<28} {r['estimator']:<9} {r['allocator']:<9} {r['steps']:>6} {r['queries']:>10} "
            f"{r['test_accuracy']:>9.4f}" + (f" {r[f'test_{metric}']:>12.4f}" if extra else "")
        )
    return "\n".join(lines)


def _test_metrics(task) -> dict[str, float]:
    return {f"test_{k}": v for k, v in task.evaluate("test").items()}


def _initial_row(config: Config, task) -> dict[str, Any]:
    return {
        "run": f"{config.run.name}-initial",
        "estimator": "-",
        "allocator": "-",
        "steps": 0,
        "queries": 0,
        **_test_metrics(task),
    }


def queries_to_reach(metrics_path: Path, key: str, target: float) -> int | None:
    """Queries consumed at the first evaluation whose ``key`` reaches ``target``."""
    for record in read_metrics(metrics_path):
        if key in record and record[key] >= target:
            return int(record["queries"])
    return None


def reach_notes(config: Config, metric: str) -> list[str]:
    """Each other allocator's queries to reach the uniform run's final validation metric."""
    runs = {config.allocator.name: _metrics(config)}
    for allocator in config.compare.allocators:
        other = with_overrides(config, {"run.name": f"{config.run.name}-{allocator}"})
        runs[allocator] = _metrics(other)
    if "uniform" not in runs or len(runs) < 2:
        return []
    key = f"val_{metric}"
    evals = [r for r in read_metrics(runs["uniform"]) if key in r]
    if not evals:
        return []
    target, total = evals[-1][key], evals[-1]["queries"]
    lines = [f"uniform's final validation {metric}: {target:.4f} after {total} queries"]
    if evals[0][key] >= target:
        lines[0] += " (uniform was already there at its first evaluation: no real target)"
    for allocator, path in runs.items():
        if allocator == "uniform":
            continue
        reached = queries_to_reach(path, key, target)
        lines.append(
            f"  {allocator}: reached it after {reached} queries ({reached / total:.0%} of uniform's)"
            if reached is not None
            else f"  {allocator}: did not reach it"
        )
    return lines


def backprop_notes(results: list[dict[str, Any]], metric: str) -> list[str]:
    key = f"test_{metric}"
    backprop = [r for r in results if r["estimator"] == "backprop" and key in r]
    forward = [r for r in results if r["estimator"] not in ("backprop", "-") and key in r]
    if not backprop or not forward or not backprop[0][key]:
        return []
    return [
        f"{r['run']}: test {metric} {r[key]:.4f} = {r[key] / backprop[0][key]:.0%} of backpropagation's"
        for r in forward
    ]
