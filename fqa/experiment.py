"""The main job: pretrain (cached) -> forward-only fine-tuning -> the same budget with
other allocators -> a backpropagation reference, then one comparison table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fqa.backprop import ensure_pretrained, train_backprop
from fqa.config import Config, with_overrides
from fqa.plots import plot_runs
from fqa.setup import build_task
from fqa.trainer import Trainer


def run_experiment(
    config: Config, trainer_factory: Callable[[Config], Trainer] = Trainer
) -> dict[str, Any]:
    """``trainer_factory`` builds the main run's trainer (the cluster layer passes its
    ``ClusterTrainer``); the comparison runs always use the single-process ``Trainer``."""
    progress = config.train.progress
    if config.pretrain.enabled and not config.model.checkpoint:
        checkpoint = ensure_pretrained(config, progress)
        config = with_overrides(
            config, {"model.checkpoint": str(checkpoint), "pretrain.enabled": False}
        )

    results = [trainer_factory(config).fit()]
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
        results.append(Trainer(other).fit())
        curves[f"{config.estimator.name}/{allocator}"] = _metrics(other)
    if config.compare.backprop:
        steps = config.compare.backprop_steps or config.train.steps
        task = build_task(config)
        results.append(train_backprop(task, config, steps, progress, f"{config.run.name}-backprop"))

    out = Path(config.run.out_dir) / config.run.name
    table = format_table(results)
    (out / "comparison.json").write_text(json.dumps(results, indent=1))
    (out / "comparison.txt").write_text(table + "\n")
    plot_runs(curves, out / "comparison.png", title=f"{config.run.name}: forward-only fine-tuning")
    return {"runs": results, "table": table, "dir": str(out)}


def _metrics(config: Config) -> Path:
    return Path(config.run.out_dir) / config.run.name / "metrics.jsonl"


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'run':<28} {'estimator':<9} {'allocator':<9} {'steps':>6} {'queries':>10} {'test acc':>9}"
    ]
    for r in results:
        lines.append(
            f"{r['run']:<28} {r['estimator']:<9} {r['allocator']:<9} {r['steps']:>6} {r['queries']:>10} "
            f"{r['test_accuracy']:>9.4f}"
        )
    return "\n".join(lines)
