"""The single-process forward-learning loop: the reference the cluster layer must match.

One step, top to bottom (docs/ARCHITECTURE.md, "One step"):
batch ids -> pre-pass losses -> allocation -> shards -> queries -> ĝ in .grad ->
optimizer step -> statistics and allocator update -> metrics.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fqa.checkpoint import config_differences, latest_checkpoint, load_checkpoint, save_checkpoint
from fqa.config import Config
from fqa.estimators import Shard, ShardResult
from fqa.plots import plot_run
from fqa.setup import BatchSampler, build_allocator, build_estimator, build_optimizer, build_task
from fqa.stats import DatapointStats
from fqa.step import Planned, QueryPlanner, ReplicaUpdater, step_metrics
from fqa.tasks.models import CheckpointError

log = logging.getLogger(__name__)

# config fields that may change between a run and its resumption
_RESUMABLE_CHANGES = (
    "run.",
    "train.steps",
    "train.progress",
    "train.eval_every",
    "train.checkpoint_every",
    "compare.",
    "cluster.",  # the same run may resume on another number of workers
)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); a valid checkpoint remains."""


@dataclass
class StepPlan:
    step: int
    ids: np.ndarray
    prepass: dict[str, np.ndarray]
    planned: Planned

    @property
    def shards(self) -> list[Shard]:
        return self.planned.shards


class Trainer:
    def __init__(self, config: Config, task=None) -> None:
        self.config = config
        self.run_dir = Path(config.run.out_dir) / config.run.name
        self.task = task if task is not None else build_task(config)
        self.estimator = build_estimator(config, self.task)
        self.variance_scale = self.estimator.variance_scale(self.task)
        self.planner = QueryPlanner(
            config, self.estimator, build_allocator(config), self.variance_scale
        )
        self.params = [p for _, p in self.task.trainable_parameters()]
        self.optimizer = build_optimizer(config, self.params)
        self.updater = ReplicaUpdater(config, self.task, self.estimator, self.optimizer)
        self.sampler = BatchSampler(self.task.train_ids(), config.train.batch_size, config.run.seed)
        self.global_step = 0  # steps done; the next step's index
        self.queries = 0  # every forward evaluation of one datapoint, pre-pass included
        self.skipped_in_a_row = 0
        self.nonfinite_total = 0
        if config.run.resume:
            self._maybe_resume()

    @property
    def allocator(self):
        return self.planner.allocator

    @property
    def stats(self) -> DatapointStats:
        return self.planner.stats

    # ---- one step -------------------------------------------------------------------
    def plan_step(self, step: int) -> StepPlan:
        ids = self.sampler.batch(step)
        prepass = self.task.prepass(ids)  # B queries: baselines, allocator input, train metrics
        return StepPlan(step, ids, prepass, self.planner.plan(step, ids, prepass["loss"]))

    def evaluate_shards(self, plan: StepPlan) -> list[ShardResult]:
        return [self.estimator.evaluate(self.task, shard) for shard in plan.shards]

    def apply_step(self, plan: StepPlan, results: list[ShardResult]) -> dict[str, Any]:
        """Reduce, step the optimizer (unless anything is non-finite), learn, report."""
        started = time.perf_counter()
        self.queries += len(plan.ids) + sum(r.queries for r in results)
        prepass_nonfinite = int((~np.isfinite(plan.prepass["loss"])).sum())
        update = self.estimator.reduce(plan.shards, results)
        outcome = self.updater.apply(plan.step, update, prepass_nonfinite)
        if outcome.skipped:
            # a non-finite query never reaches the parameters or the statistics
            self.nonfinite_total += max(outcome.nonfinite, 1)
            self.skipped_in_a_row += 1
            learned = {}
        else:
            self.skipped_in_a_row = 0
            learned = self.planner.learn(plan.planned, results)
        metrics = {
            **step_metrics(plan.planned, plan.prepass, results, outcome, self.variance_scale),
            "queries": self.queries,
            "apply_seconds": time.perf_counter() - started,
            **learned,
        }
        self.global_step = plan.step + 1
        return metrics

    def step(self) -> dict[str, Any]:
        """One training step, top to bottom; returns its metrics (with validation
        metrics when an evaluation is due)."""
        started = time.perf_counter()
        plan = self.plan_step(self.global_step)
        metrics = self.apply_step(plan, self.evaluate_shards(plan))
        metrics["step_seconds"] = time.perf_counter() - started
        cfg = self.config.train
        if self.global_step % cfg.eval_every == 0 or self.global_step == cfg.steps:
            metrics.update({f"val_{k}": v for k, v in self.task.evaluate("validation").items()})
        return metrics

    # ---- the loop ---------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.config.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(
            json.dumps(self.config.model_dump(mode="json"), indent=1)
        )
        metrics_path = self.run_dir / "metrics.jsonl"
        _truncate_metrics(metrics_path, self.global_step)
        bar = tqdm(
            total=cfg.steps,
            initial=self.global_step,
            disable=not cfg.progress,
            desc=self.config.run.name,
        )
        with open(metrics_path, "a") as sink:
            while self.global_step < cfg.steps:
                metrics = self.step()
                sink.write(json.dumps(metrics) + "\n")
                sink.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", q=self.queries)
                if self.skipped_in_a_row >= cfg.max_nonfinite_steps:
                    path = self.save()
                    raise TrainingError(
                        f"{self.skipped_in_a_row} steps in a row had non-finite losses or gradients "
                        f"(last at step {metrics['step']}); parameters are unchanged since step "
                        f"{metrics['step'] - self.skipped_in_a_row + 1} and saved in {path}. Lower train.lr "
                        "or the perturbation scale, or check the data"
                    )
                if self.global_step % cfg.checkpoint_every == 0:
                    self.save()
        bar.close()
        self.save()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        test = self.task.evaluate("test")
        validation = self.task.evaluate("validation")
        summary = {
            "run": self.config.run.name,
            "estimator": self.config.estimator.name,
            "allocator": self.config.allocator.name,
            "steps": self.global_step,
            "queries": self.queries,
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            "val_accuracy": validation["accuracy"],
            "nonfinite": self.nonfinite_total,
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        plot_run(
            self.run_dir / "metrics.jsonl", self.run_dir / "curves.png", title=self.config.run.name
        )
        return summary

    # ---- checkpoints --------------------------------------------------------------------
    def save(self) -> Path:
        state = {
            "queries": self.queries,
            "skipped_in_a_row": self.skipped_in_a_row,
            "nonfinite_total": self.nonfinite_total,
            **self.planner.state(),
            "config": self.config.model_dump(mode="json"),
        }
        return save_checkpoint(
            self.run_dir / "checkpoints",
            self.global_step,
            self.task.model,
            self.optimizer,
            self.stats,
            state,
        )

    def _maybe_resume(self) -> None:
        path = latest_checkpoint(self.run_dir / "checkpoints")
        if path is not None:
            self.restore(path)

    def restore(self, path: Path) -> None:
        data = load_checkpoint(path)
        differences = [
            d
            for d in config_differences(data.state["config"], self.config.model_dump(mode="json"))
            if not d.startswith(_RESUMABLE_CHANGES)
        ]
        if differences:
            raise CheckpointError(
                f"checkpoint {path} was written with another config; differing fields: "
                f"{', '.join(differences)}. Use the original config or a new run.name"
            )
        self.task.model.load_state_dict(data.model)
        self.optimizer.load_state_dict(data.optimizer)
        self.planner.load_state(
            data.state, DatapointStats.load(data.stats_path, self.config.allocator.stats_decay)
        )
        self.global_step = data.state["step"]
        self.queries = data.state["queries"]
        self.skipped_in_a_row = data.state["skipped_in_a_row"]
        self.nonfinite_total = data.state["nonfinite_total"]
        log.info("resumed %s at step %d (%d queries)", path, self.global_step, self.queries)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the resumed step, so every step index appears exactly once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a killed driver: the step reruns
            continue
        if record["step"] < step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
