"""Ray Tune over jobs.train configs: one ``ClusterTrainer`` per trial, in its own placement group.

Each trial reserves a driver bundle plus one bundle per QueryWorker together
(``PlacementGroupFactory``); the driver's workers and AllocatorActor are created inside
that group (Tune captures child tasks), so concurrent trials never wait on each other's
workers. The trial reports through ``ClusterTrainer`` (metrics at every evaluation, a
checkpoint with each save) and resumes from Tune's checkpoint when it is retried.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import ray
from ray.tune import Callback

from cluster.runtime import ClusterResourceError
from cluster.sweep_config import SweepConfig, trial_config
from fqa.backprop import with_pretrained
from fqa.checkpoint import latest_checkpoint, publish_checkpoint, write_text_atomic
from fqa.config import Config, with_overrides
from fqa.storage import Remote, location, rmtree

log = logging.getLogger(__name__)

_PRETRAIN_KEYS = ("run.seed", "data.", "model.", "pretrain.")  # what the pretraining cache keys on


class InjectedTrialCrash(RuntimeError):
    """Raised by the test-only ``crash_at_step`` hook."""


def trial_bundles(config: Config, driver_cpus: float) -> list[dict[str, float]]:
    """The driver's bundle, then one per QueryWorker (the AllocatorActor needs no CPU)."""
    cc = config.cluster
    worker = {"CPU": cc.cpus_per_worker, "GPU": cc.gpus_per_worker}
    return [{"CPU": driver_cpus}] + [dict(worker) for _ in range(cc.num_workers)]


def placement_group_factory(config: Config, driver_cpus: float):
    from ray import tune

    return tune.PlacementGroupFactory(trial_bundles(config, driver_cpus), strategy="PACK")


def probe_configs(sweep: SweepConfig, base: Config) -> list[Config]:
    """Trial configs at every combination of the space's listed values / range ends."""
    keys = list(sweep.space)
    combos = itertools.islice(
        itertools.product(*(sweep.space[k].probe_values() for k in keys)), 4096
    )
    return [trial_config(base, sweep, dict(zip(keys, c, strict=True))) for c in combos]


def check_resources(sweep: SweepConfig, base: Config) -> int:
    """Fail before any trial when one trial's placement group can never be placed; return
    how many trials the cluster holds at once."""
    total = ray.cluster_resources()
    largest_node: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for name, amount in node.get("Resources", {}).items():
                largest_node[name] = max(largest_node.get(name, 0.0), amount)
    fits = []
    for config in probe_configs(sweep, base):
        bundles = trial_bundles(config, sweep.driver_cpus)
        need = {r: sum(b.get(r, 0.0) for b in bundles) for r in ("CPU", "GPU")}
        for name, amount in need.items():
            have = float(total.get(name, 0.0))
            if amount > have + 1e-9:
                cc = config.cluster
                raise ClusterResourceError(
                    f"one trial needs {amount:g} {name} (driver {sweep.driver_cpus:g} CPU + "
                    f"{cc.num_workers} workers x {cc.cpus_per_worker:g} CPU / "
                    f"{cc.gpus_per_worker:g} GPU), but the Ray cluster has {have:g} {name} in "
                    f"total; it could never start. Lower cluster.num_workers or cluster."
                    f"{'cpus' if name == 'CPU' else 'gpus'}_per_worker (or driver_cpus), or add nodes"
                )
        for bundle in bundles:
            for name, amount in bundle.items():
                if amount > largest_node.get(name, 0.0) + 1e-9:
                    raise ClusterResourceError(
                        f"a trial bundle asks for {amount:g} {name} but no node has that much "
                        f"(largest: {largest_node.get(name, 0.0):g}); lower the per-worker share"
                    )
        fits.append(
            min(
                math.floor(float(total.get(r, 0.0)) / amount + 1e-9)
                for r, amount in need.items()
                if amount > 0
            )
            if any(need.values())
            else 1
        )
    return max(1, min(fits))


def pretrain_once(sweep: SweepConfig, base: Config) -> None:
    """Backprop pretraining is cached by fingerprint: do it here, before any trial, for
    every pretraining the space can select (trials then only read the cache)."""
    configs = [base]
    if any(k.startswith(_PRETRAIN_KEYS) for k in sweep.space):
        configs += probe_configs(sweep, base)
    seen = set()
    for config in configs:
        key = config.fingerprint(("run.seed", "data", "model", "pretrain"))
        if key not in seen and config.pretrain.enabled and not config.model.checkpoint:
            seen.add(key)
            with_pretrained(config)


def _restore_tune_checkpoint(checkpoint_dir: Path | Remote) -> None:
    """A retried or restored trial gets Tune's latest checkpoint; put it where the
    Trainer resumes from, unless a newer one is already there (same machine)."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as source:
        step = json.loads((Path(source) / "state.json").read_text())["step"]
        current = latest_checkpoint(checkpoint_dir)
        if current is not None and int(current.name.split("-")[1]) >= step:
            return
        if isinstance(checkpoint_dir, Remote):
            publish_checkpoint(Path(source), checkpoint_dir / f"step-{step:06d}")
            log.info("trial resumes from Tune checkpoint at step %d", step)
            return
        target = checkpoint_dir / f"step-{step:06d}"
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint_dir / f".{target.name}.tune-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        write_text_atomic(checkpoint_dir / "latest", target.name)
    log.info("trial resumes from Tune checkpoint at step %d", step)


def run_trial(params: dict[str, Any], *, base_json: str, sweep_json: str, runs_dir: str) -> None:
    """The Tune trainable: one distributed training run; its run directory is
    ``runs_dir/<trial id>`` (metrics.jsonl, checkpoints, summary.json)."""
    import torch
    from ray import tune

    from cluster.driver import ClusterTrainer

    torch.set_num_threads(1)  # the driver replica shares its node with the workers
    base = Config.model_validate_json(base_json)
    sweep = SweepConfig.model_validate_json(sweep_json)
    name = tune.get_context().get_trial_id()
    config = with_overrides(
        trial_config(base, sweep, params),
        {"run.out_dir": runs_dir, "run.name": name, "run.resume": True, "train.progress": False},
    )
    run_dir = location(runs_dir) / name
    _restore_tune_checkpoint(run_dir / "checkpoints")
    trainer = ClusterTrainer(with_pretrained(config))
    if sweep.crash_at_step is not None:
        trainer.executor.fault_hook = _crash_once(
            run_dir / "crashed", sweep.crash_at_step, trainer.checkpoint_dir
        )
    trainer.fit()


def _crash_once(marker: Path, at_step: int, checkpoint_dir: Path):
    """Raise once at ``at_step``, first deleting the trial's local checkpoints as a lost
    node would: the retry can then only resume from the checkpoint Tune persisted."""

    def hook(pool, step: int) -> None:
        if step == at_step and not marker.exists():
            marker.write_text(str(step))
            rmtree(checkpoint_dir)
            raise InjectedTrialCrash(f"injected crash at step {step} (sweep crash_at_step)")

    return hook


def _trial_dirname(trial) -> str:
    return trial.trial_id


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    space = {}
    for key, spec in sweep.space.items():
        if spec.kind == "grid":
            space[key] = tune.grid_search(list(spec.grid))
        elif spec.kind == "choice":
            space[key] = tune.choice(list(spec.choice))
        elif spec.kind == "loguniform":
            space[key] = tune.loguniform(*spec.loguniform)
        else:
            space[key] = tune.uniform(*spec.uniform)
    return space


def max_queries(sweep: SweepConfig, base: Config) -> int:
    if sweep.total_queries is not None:
        return sweep.total_queries
    return max(
        c.train.steps * c.train.batch_size * (c.train.queries_per_datapoint + 1)
        for c in probe_configs(sweep, base)
    )


def make_scheduler(sweep: SweepConfig, base: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if sweep.scheduler.name == "none":
        return FIFOScheduler()
    horizon = max_queries(sweep, base)
    return ASHAScheduler(
        time_attr="queries",  # trials are compared at equal query cost, not equal steps
        max_t=horizon,
        grace_period=sweep.scheduler.grace_queries or max(1, horizon // 8),
        reduction_factor=sweep.scheduler.reduction_factor,
        stop_last_trials=False,  # a trial ends at its own budget (summary, test accuracy)
    )


def build_tuner(sweep: SweepConfig, base: Config, sweep_dir: Path, resume: bool, concurrency: int):
    from ray import tune

    runs_dir = str(sweep_dir / "runs")  # trial run directories: a path or a URI
    trainable = tune.with_parameters(
        run_trial,
        base_json=base.model_dump_json(),
        sweep_json=sweep.model_dump_json(),
        runs_dir=runs_dir,
    )
    driver_cpus = sweep.driver_cpus
    # resources follow the trial's own config (cluster.* may be in the space)
    trainable = tune.with_resources(
        trainable,
        lambda params: placement_group_factory(trial_config(base, sweep, params), driver_cpus),
    )
    if resume:
        return tune.Tuner.restore(
            tune_path(sweep_dir),
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=tune_filesystem(sweep_dir),
        )
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            scheduler=make_scheduler(sweep, base),
            num_samples=sweep.num_samples,
            max_concurrent_trials=sweep.max_concurrent_trials or concurrency,
            time_budget_s=sweep.time_budget_s,
            trial_dirname_creator=_trial_dirname,  # = the run directory's name
        ),
        run_config=tune.RunConfig(
            name=sweep_dir.name,
            storage_path=tune_path(sweep_dir.parent),  # object storage: Tune writes there too
            storage_filesystem=tune_filesystem(sweep_dir),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            # Tune's status table ranks trials by their last report, the sweep's ranking by
            # their best evaluation: silence it and log each trial's end instead
            verbose=0,
            callbacks=[TrialLog(sweep.metric)],
        ),
    )


class TrialLog(Callback):
    """One log line per finished or failed trial (the ranking comes at the end)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        log.info(
            "trial %s finished (%d/%d): last %s=%s after %s queries",
            trial.trial_id,
            done,
            len(trials),
            self.metric,
            last.get(self.metric),
            last.get("queries"),
        )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        log.warning("trial %s failed (Tune retries it up to max_failures)", trial.trial_id)


def sweep_directory(sweep: SweepConfig) -> Path | Remote:
    storage = location(sweep.storage)
    if isinstance(storage, Remote):
        storage.check_bucket()
        return storage / sweep.name
    return (storage / sweep.name).resolve()


def tune_path(path: Path | Remote) -> str:
    """Tune's storage path: inside ``tune_filesystem`` for object storage."""
    return path.path if isinstance(path, Remote) else str(path)


def tune_filesystem(path: Path | Remote):
    """Our pyarrow filesystem (endpoint, credentials, timeouts from fqa.storage), or None."""
    return path.fs if isinstance(path, Remote) else None


def run_sweep(sweep: SweepConfig, base: Config, resume: bool = False):
    """Check resources, pretrain once, run (or resume) the Tuner; returns its ResultGrid."""
    from ray import tune

    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # trials read the same relative paths as jobs.train
    sweep_dir = sweep_directory(sweep)
    fs = tune_filesystem(sweep_dir)
    if resume and not tune.Tuner.can_restore(tune_path(sweep_dir), storage_filesystem=fs):
        raise FileNotFoundError(
            f"--resume: no Tune experiment state in {sweep_dir}; run without --resume first"
        )
    if (
        not resume
        and sweep_dir.exists()
        and tune.Tuner.can_restore(tune_path(sweep_dir), storage_filesystem=fs)
    ):
        raise FileExistsError(
            f"{sweep_dir} already holds sweep {sweep.name!r}; pass --resume to continue it, "
            "or set another name / storage"
        )
    concurrency = check_resources(sweep, base)
    pretrain_once(sweep, base)
    log.info(
        "sweep %s: up to %d concurrent trials, outputs in %s", sweep.name, concurrency, sweep_dir
    )
    tuner = build_tuner(sweep, base, sweep_dir, resume, concurrency)
    return tuner.fit(), sweep_dir
