"""The single-process forward-learning loop: the reference the cluster layer must match.

One step, top to bottom (docs/ARCHITECTURE.md, "One step"):
batch ids -> pre-pass losses -> allocation -> shards -> queries -> ĝ in .grad ->
optimizer step -> statistics and allocator update -> metrics.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fqa.checkpoint import (
    CheckpointError,
    config_differences,
    latest_checkpoint,
    stats_file,
)
from fqa.config import Config
from fqa.executor import Executor, InProcessExecutor
from fqa.progress import Progress
from fqa.run_storage import RunStorage
from fqa.setup import BatchSampler, build_allocator
from fqa.stats import DatapointStats
from fqa.step import QueryPlanner, step_metrics
from fqa.storage import Remote, location

log = logging.getLogger(__name__)


# config fields that may change between a run and its resumption
_RESUMABLE_CHANGES = (
    "run.",
    "train.steps",
    "train.progress",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "compare.",
    "cluster.",  # the same run may resume on another number of workers
)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); a valid checkpoint remains."""


class Trainer:
    """The step loop over an executor: in process by default, or e.g. the Ray worker
    pool (``cluster.driver.ClusterTrainer``), which keeps no model in this process."""

    def __init__(self, config: Config, task=None, executor: Executor | None = None) -> None:
        self.config = config
        # a local directory or an object-store prefix (fqa.run_storage, fqa.storage)
        self.storage = RunStorage(location(config.run.out_dir) / config.run.name)
        self.run_dir = self.storage.run_dir
        self.storage.check()
        self.executor = executor if executor is not None else InProcessExecutor(config, task)
        self.estimator = self.executor.estimator
        self.variance_scale = self.executor.variance_scale()
        self.planner = QueryPlanner(
            config, self.estimator, build_allocator(config), self.variance_scale
        )
        self.sampler = BatchSampler(
            self.executor.train_ids(), config.train.batch_size, config.run.seed
        )
        self.global_step = 0  # steps done; the next step's index
        self.queries = 0  # every forward evaluation of one datapoint, pre-pass included
        self.skipped_in_a_row = 0
        self.nonfinite_total = 0
        # observers of the run (e.g. Tune reports, the soak's memory samples): objects
        # with any of on_step(trainer, metrics), on_checkpoint(trainer, path), on_finish(trainer)
        self.callbacks: list[Any] = []
        if config.run.resume:
            self._maybe_resume()

    # the in-process replica, for tests and benchmarks (the worker pool has none here)
    @property
    def task(self):
        return self.executor.task

    @property
    def params(self) -> list[torch.Tensor]:
        return self.executor.params

    @property
    def allocator(self):
        return self.planner.allocator

    @property
    def stats(self) -> DatapointStats:
        return self.planner.stats

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    # ---- one step -------------------------------------------------------------------
    def step(self) -> dict[str, Any]:
        """One training step, top to bottom; returns its metrics (with validation
        metrics when an evaluation is due)."""
        started = time.perf_counter()
        step = self.global_step
        ids = self.sampler.batch(step)
        prepass = self.executor.prepass(step, ids)
        planned = self.planner.plan(step, ids, prepass["loss"])
        results = self.executor.evaluate(step, planned.shards)
        applying = time.perf_counter()
        self.queries += len(ids) + sum(r.queries for r in results)
        prepass_nonfinite = int((~np.isfinite(prepass["loss"])).sum())
        update = self.estimator.reduce(planned.shards, results)
        outcome = self.executor.apply(step, update, prepass_nonfinite)
        if outcome.skipped:
            # a non-finite query never reaches the parameters or the statistics
            self.nonfinite_total += max(outcome.nonfinite, 1)
            self.skipped_in_a_row += 1
            learned = {}
        else:
            self.skipped_in_a_row = 0
            learned = self.planner.learn(planned, results)
        metrics = {
            **step_metrics(planned, prepass, results, outcome, self.variance_scale),
            "queries": self.queries,
            "apply_seconds": time.perf_counter() - applying,
            **learned,
            **self.executor.step_metrics(),
        }
        self.global_step = step + 1
        metrics["step_seconds"] = time.perf_counter() - started
        cfg = self.config.train
        if self.global_step % cfg.eval_every == 0 or self.global_step == cfg.steps:
            metrics.update({f"val_{k}": v for k, v in self.evaluate("validation").items()})
        self._notify("on_step", metrics)
        return metrics

    def evaluate(self, split: str) -> dict[str, float]:
        return self.executor.evaluate_split(split)

    @property
    def primary_metric(self) -> str:
        return self.executor.primary_metric()

    def close(self) -> None:
        self.planner.close()
        self.executor.close()

    def _notify(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(self, *args)

    # ---- the loop ---------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        try:
            return self._fit()
        finally:
            self.close()  # the worker pool's actors go; an in-process replica stays

    def _fit(self) -> dict[str, Any]:
        cfg = self.config.train
        if self.global_step > cfg.steps:
            log.warning(
                "run %s already finished %d steps, more than train.steps=%d: returning its "
                "results unchanged (use a new run.name to train a shorter run)",
                self.run_dir,
                self.global_step,
                cfg.steps,
            )
        self.storage.write_json("config.json", self.config.model_dump(mode="json"))
        self.storage.open_metrics(self.global_step)
        bar = Progress(
            cfg.steps,
            self.config.run.name,
            enabled=cfg.progress,
            every=cfg.log_every,
            initial=self.global_step,
        )
        try:
            while self.global_step < cfg.steps:
                metrics = self.step()
                self.storage.append(metrics)
                bar.update(1, loss=f"{metrics['loss']:.3f}", queries=self.queries)
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
        finally:
            self.storage.close_metrics()
        bar.close()
        self.save()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        test = self.evaluate("test")
        validation = self.evaluate("validation")
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
            **{f"test_{k}": v for k, v in test.items()},  # a task's own metrics too
            **self.executor.summary(),
            "run_dir": str(self.run_dir),
        }
        if self.global_step > self.config.train.steps:
            summary["note"] = (
                f"the run had already finished {self.global_step} steps, more than "
                f"train.steps={self.config.train.steps}; these are its results"
            )
        self.storage.write_json("summary.json", summary)
        self._notify("on_finish")
        return summary  # plots are the entrypoints' (RunStorage.plot)

    # ---- checkpoints --------------------------------------------------------------------
    def save(self) -> Path | Remote:
        self.storage.sync()  # metrics first: a resumed run has the lines of its checkpoint
        state = {
            "queries": self.queries,
            "skipped_in_a_row": self.skipped_in_a_row,
            "nonfinite_total": self.nonfinite_total,
            **self.planner.state(),
            "config": self.config.model_dump(mode="json"),
        }
        path = self.executor.save_checkpoint(
            self.checkpoint_dir, self.global_step, self.stats, state
        )
        self.planner.checkpointed(self.global_step)
        self._notify("on_checkpoint", path)
        return path

    def _maybe_resume(self) -> None:
        path = latest_checkpoint(self.checkpoint_dir)
        if path is not None:
            self.restore(path)
        else:
            log.info("no checkpoint in %s: run %s starts fresh", self.run_dir, self.config.run.name)

    def restore(self, path: Path | Remote) -> None:
        def same_config(state: dict[str, Any]) -> None:
            differences = [
                d
                for d in config_differences(state["config"], self.config.model_dump(mode="json"))
                if not d.startswith(_RESUMABLE_CHANGES)
            ]
            if differences:
                raise CheckpointError(
                    f"checkpoint {path} was written with another config; differing fields: "
                    f"{', '.join(differences)}. Use the original config or a new run.name"
                )

        state = self.executor.restore(path, same_config)
        self.planner.load_state(
            state,
            DatapointStats.load(stats_file(path), self.config.allocator.stats_decay),
        )
        self.global_step = state["step"]
        self.queries = state["queries"]
        self.skipped_in_a_row = state["skipped_in_a_row"]
        self.nonfinite_total = state["nonfinite_total"]
        log.info("resumed %s at step %d (%d queries)", path, self.global_step, self.queries)
