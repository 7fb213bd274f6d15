"""The distributed driver: ``fqa.trainer.Trainer``'s loop with the queries on Ray actors.

``ClusterTrainer`` subclasses the single-process ``Trainer`` and overrides only where
work happens: the pre-pass and the shards run on QueryWorkers, planning and learning on
the AllocatorActor (through ``RemotePlanner``), and each update is replayed on every
worker. The driver keeps its own replica and applies the same update, so metrics,
evaluation, checkpoints, resume and plots are the Trainer's own code.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from cluster.allocator_actor import RemotePlanner, actor_is_dead
from cluster.dispatch import evaluate_on_workers
from cluster.runtime import ClusterResourceError, connect, require_resources
from cluster.worker import parameter_checksum, remote_worker_class
from fqa.config import Config
from fqa.estimators import ShardResult, Update
from fqa.storage import Remote
from fqa.trainer import StepPlan, Trainer

log = logging.getLogger(__name__)

_MAX_RESTARTS = 4  # per worker; a worker past this is dropped and its shards go elsewhere
_START_TIMEOUT_S = 300.0  # model build + data load on a fresh worker
# past this many bytes of logged lr gradients, a restarted worker is resynced from the
# driver instead of replaying the log, which keeps the driver's memory bounded
_UPDATE_LOG_BYTES = 64 * 1024**2


class ClusterError(RuntimeError):
    """The cluster lost every worker; the last checkpoint remains valid."""


def in_tune_session() -> bool:
    """True inside a Tune trial / Train worker, where ray.tune.report works."""
    try:
        from ray.train._internal.session import get_session
    except ImportError:  # the session module moved: report nothing rather than fail
        return False
    return get_session() is not None


class ClusterTrainer(Trainer):
    def __init__(self, config: Config, task=None) -> None:
        super().__init__(config, task)  # the driver's replica; resumes from a checkpoint
        cc = config.cluster
        self._owns_ray = connect()
        require_resources(cc.num_workers, cc.cpus_per_worker, cc.gpus_per_worker)
        config_json = config.model_dump_json()

        self.planner = RemotePlanner(  # Trainer.apply_step/save now go remote
            config_json,
            self.variance_scale,
            self.checkpoint_dir,
            self.planner.state(),
            self.planner.stats,
            self.global_step,
        )

        worker_class = remote_worker_class(cc.cpus_per_worker, cc.gpus_per_worker, _MAX_RESTARTS)
        threads = max(1, int(cc.cpus_per_worker))
        self.workers = [worker_class.remote(config_json, threads) for _ in range(cc.num_workers)]
        self._await_workers()
        self.dirty: set[int] = set(range(len(self.workers)))  # all load the driver's state
        self.lost: set[int] = set()  # restarted workers, rebuilt from the checkpoint
        # each step's update as broadcast since the last checkpoint: with that checkpoint,
        # all a restarted worker needs to rebuild its replica
        self.updates: list[tuple[int, Update, int]] = []
        self.update_bytes = 0  # tensor bytes held by self.updates
        self.log_complete = True  # False once the log was dropped for its size
        self.checkpoint: Path | None = getattr(self, "checkpoint", None)  # set on resume
        self.rebuilt = 0  # restarted workers rebuilt from checkpoint + updates
        # bumped when a worker is rebuilt or resynced, so failures of calls sent to its
        # previous instance (several shards in flight) do not rebuild it again
        self.generation = [0] * len(self.workers)
        self.dead: set[int] = set()
        self.resyncs = 0  # checksum mismatches repaired
        self.redispatched = 0  # shards re-run after their worker died
        self.hung = 0  # workers killed for holding work past cluster.shard_timeout_s
        self.duplicates = 0  # shard results for an already answered (step, shard) key
        self.result_bytes: list[int] = []  # pickled shard results returned per step
        self.replica_checksums: list[str] = []  # the workers' checksums at the end of fit
        # tests inject faults here: called once per step after the shards are dispatched
        self.fault_hook: Callable[[ClusterTrainer, int], None] | None = None
        self._pending: dict[str, Any] | None = None  # metrics not yet reported to Tune

    # ---- workers --------------------------------------------------------------------
    def _await_workers(self) -> None:
        refs = [w.ready.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=_START_TIMEOUT_S)
        if len(ready) < len(refs):
            self.close()
            raise ClusterResourceError(
                f"only {len(ready)} of {len(refs)} workers started within {_START_TIMEOUT_S:.0f}s; "
                f"available resources: {ray.available_resources()} (other jobs may hold them)"
            )
        ray.get(ready)  # surface a worker's start-up exception (bad data dir, model name)

    def _state_refs(self) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        # top-level ObjectRef arguments are resolved on the worker: one upload for all
        return ray.put(self.task.model.state_dict()), ray.put(self.optimizer.state_dict())

    def _live(self) -> list[int]:
        """Workers able to take work now. A restarted one is first rebuilt from the last
        checkpoint plus the updates since; with no checkpoint yet, or when that fails, it
        loads the driver's replica (as does a worker whose checksum mismatched)."""
        for index in sorted(self.lost - self.dead):
            if self.checkpoint is None or not self.log_complete or not self._rebuild(index):
                self.dirty.add(index)
        self.lost.clear()
        if self.dirty - self.dead:
            state = self._state_refs()
            for index in sorted(self.dirty - self.dead):
                if not self._resync(index, state):
                    log.warning("worker %d is gone for good; continuing without it", index)
                    self.dead.add(index)
            self.dirty.clear()
        live = [i for i in range(len(self.workers)) if i not in self.dead]
        if not live:
            raise ClusterError("every worker died; rerun the job to resume from the checkpoint")
        return live

    def _resync(self, index: int, state: tuple[ray.ObjectRef, ray.ObjectRef]) -> bool:
        """Load the driver's state into a worker, waiting while Ray restarts it (calls
        fail with RayActorError until the new instance is up)."""
        worker = self.workers[index]
        done, _ = self._call_while_restarting(
            index, lambda: worker.load_state.remote(*state, self.global_step)
        )
        if done:
            self.generation[index] += 1
        return done

    def _call_while_restarting(self, index: int, call) -> tuple[bool, Any]:
        """``ray.get(call())`` on worker ``index``, retried while Ray restarts the actor.
        Returns (True, value), or (False, None) on a timeout or a worker out of restarts."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                return True, ray.get(call(), timeout=_START_TIMEOUT_S)
            except GetTimeoutError:
                return False, None
            except RayActorError:
                if actor_is_dead(self.workers[index]):  # out of restarts: gone for good
                    return False, None
                time.sleep(0.5)
        return False, None

    def _rebuild(self, index: int) -> bool:
        worker = self.workers[index]
        done, value = self._call_while_restarting(
            index, lambda: worker.restore.remote(str(self.checkpoint), self.updates)
        )
        if not done:
            return False
        if value != parameter_checksum(self.params):
            log.warning("worker %d rebuilt from %s differs from the driver", index, self.checkpoint)
            return False
        self.rebuilt += 1
        self.generation[index] += 1
        log.info(
            "worker %d rebuilt from %s + %d updates", index, self.checkpoint, len(self.updates)
        )
        return True

    def _hung(self, index: int, why: str) -> None:
        """Kill a worker that stopped answering; Ray restarts it and _live() rebuilds it."""
        log.warning("worker %d is hung (%s); restarting it", index, why)
        self.hung += 1
        ray.kill(self.workers[index], no_restart=False)
        self.lost.add(index)

    def _get(self, index: int, ref: ray.ObjectRef) -> Any:
        """A worker call's result within cluster.shard_timeout_s; None if the worker died
        or hung (it is then rebuilt before its next call)."""
        limit = self.config.cluster.shard_timeout_s
        try:
            return ray.get(ref, timeout=limit)
        except GetTimeoutError:
            self._hung(index, f"no answer within cluster.shard_timeout_s={limit:g}s")
        except RayActorError:
            self._lost(index)
        return None

    def _lost(self, index: int, generation: int | None = None) -> None:
        if generation is not None and generation != self.generation[index]:
            return  # a call to the instance that was already replaced
        log.warning("worker %d died; it restarts and rebuilds its replica", index)
        self.lost.add(index)

    # ---- one step -------------------------------------------------------------------
    def plan_step(self, step: int) -> StepPlan:
        self._report()
        ids = self.sampler.batch(step)
        while True:  # the pre-pass on one worker; retried on another if it dies
            index = self._live()[step % len(self._live())]
            prepass = self._get(index, self.workers[index].prepass.remote(ids))
            if prepass is not None:
                break
        return StepPlan(step, ids, prepass, self.planner.plan(step, ids, prepass["loss"]))

    def evaluate_shards(self, plan: StepPlan) -> list[ShardResult]:
        """On the workers (cluster.dispatch); results in plan order, each exactly once."""
        ledger = evaluate_on_workers(self, plan)
        self.duplicates += ledger.duplicates
        results = ledger.results
        self.result_bytes.append(sum(len(pickle.dumps(r)) for r in results))
        return results  # type: ignore[return-value]

    def apply_step(self, plan: StepPlan, results: list[ShardResult]) -> dict[str, Any]:
        """Every worker replays the update while the driver applies it to its replica."""
        update = self.estimator.reduce(plan.shards, results)
        prepass_nonfinite = int((~np.isfinite(plan.prepass["loss"])).sum())
        update_ref = ray.put(update)  # one upload, shared by all workers
        refs = {
            i: self.workers[i].apply.remote(plan.step, update_ref, prepass_nonfinite)
            for i in self._live()
        }
        self._log_update(plan.step, update, prepass_nonfinite)  # after _live()
        metrics = super().apply_step(plan, results)
        for index, ref in refs.items():
            self._get(index, ref)  # a lost worker is rebuilt before its next shard
        if self.global_step % self.config.cluster.checksum_every == 0:
            self.verify_replicas()
        metrics.update(resyncs=self.resyncs, redispatched=self.redispatched, hung=self.hung)
        # the step's idempotency keys: shards planned, results accepted, duplicates ignored
        metrics.update(shards=len(plan.shards), shards_applied=len(results))
        metrics["duplicates"] = self.duplicates
        metrics["result_bytes"] = self.result_bytes[-1] if self.result_bytes else 0
        self._pending = metrics
        return metrics

    def _log_update(self, step: int, update: Update, prepass_nonfinite: int) -> None:
        """Keep the update for restarted workers, unless the log outgrew its memory cap."""
        if not self.log_complete:
            return
        self.update_bytes += update.nbytes
        if self.update_bytes > _UPDATE_LOG_BYTES:
            log.info(
                "update log past %d bytes; dropped until the next checkpoint", _UPDATE_LOG_BYTES
            )
            self.updates, self.update_bytes, self.log_complete = [], 0, False
            return
        self.updates.append((step, update, prepass_nonfinite))

    def verify_replicas(self) -> list[str]:
        """Compare the workers' parameter checksums with the driver's; resync mismatches."""
        expected = parameter_checksum(self.params)
        live = self._live()
        refs = {i: self.workers[i].checksum.remote() for i in live}
        sums: dict[int, str] = {}
        for index, ref in refs.items():
            value = self._get(index, ref)
            if value is None:
                continue
            sums[index] = value
            if value != expected:
                log.warning(
                    "worker %d's parameters differ from the driver's at step %d; resyncing",
                    index,
                    self.global_step,
                )
                self.resyncs += 1
                self.dirty.add(index)
        self._live()
        return list(sums.values())

    # ---- loop, reports, shutdown --------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        try:
            summary = super().fit()
            self.replica_checksums = self.verify_replicas()
            summary.update(workers=len(self.workers), resyncs=self.resyncs)
            summary.update(redispatched=self.redispatched, hung=self.hung)
            summary["duplicates"] = self.duplicates
            return summary
        finally:
            self.close()

    @property
    def checkpoint_dir(self):
        return self.run_dir / "checkpoints"

    def save(self):
        path = super().save()
        self.planner.checkpointed(self.global_step)
        self.checkpoint, self.updates = path, []  # the checkpoint holds every update so far
        self.update_bytes, self.log_complete = 0, True
        self._report(path)
        return path

    def restore(self, path: Path) -> None:
        super().restore(path)  # on resume, from Trainer.__init__
        self.checkpoint = path

    def finish(self) -> dict[str, Any]:
        self._report()
        return super().finish()

    def _report(self, checkpoint_dir=None) -> None:
        """Inside a Tune trial, the finished step's metrics (and checkpoint) go to Tune."""
        if self._pending is None or not in_tune_session():
            return
        if checkpoint_dir is None and not any(k.startswith("val_") for k in self._pending):
            return  # Tune gets evaluations and checkpoints: each report is a round trip
        from ray import tune

        checkpoint = None
        if isinstance(checkpoint_dir, Remote):  # already on object storage: Tune copies it
            checkpoint = tune.Checkpoint(checkpoint_dir.path, filesystem=checkpoint_dir.fs)
        elif checkpoint_dir:
            checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir))
        tune.report(_plain(self._pending), checkpoint=checkpoint)
        self._pending = None

    def close(self) -> None:
        for handle in [*getattr(self, "workers", []), getattr(self.planner, "actor", None)]:
            if handle is not None:
                ray.kill(handle)
        self.workers = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in metrics.items()}
