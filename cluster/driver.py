"""The distributed driver: ``fqa.trainer.Trainer`` over a pool of Ray QueryWorkers.

``RayWorkerPool`` is the trainer's executor: the pre-pass and the shards run on
QueryWorkers, each update is replayed on every worker, and evaluation and checkpoint
writing run on worker rank 0 (the first live one). The driver keeps no model: only the
plan, the statistics (on the AllocatorActor, through ``RemotePlanner``), the update log
since the last checkpoint and the logs. The pool owns the workers' lifecycle: start,
restart, rebuild from checkpoint + update log, resync from a healthy worker, drop a
worker past its restart limit.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from cluster.allocator_actor import RemotePlanner, actor_is_dead
from cluster.collective import CollectiveError
from cluster.dispatch import evaluate_on_workers
from cluster.runtime import ClusterResourceError, connect, require_resources
from cluster.worker import ReplicaBehind, remote_worker_class
from fqa.config import Config
from fqa.estimators import Shard, ShardResult, Update
from fqa.setup import check_data, configured_estimator
from fqa.stats import DatapointStats
from fqa.step import UpdateOutcome
from fqa.storage import Remote, location
from fqa.trainer import Trainer

log = logging.getLogger(__name__)

_MAX_RESTARTS = 4  # per worker; a worker past this is dropped and its shards go elsewhere
_START_TIMEOUT_S = 300.0  # model build + data load on a fresh worker; a checkpoint write
# past this many bytes of logged lr gradients, a restarted worker is resynced from a
# healthy worker instead of replaying the log, which keeps the driver's memory bounded
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


def ClusterTrainer(config: Config) -> Trainer:  # noqa: N802 (reads as the class it replaces)
    """``Trainer(config, executor=RayWorkerPool(config))`` with the planner on an
    AllocatorActor and, inside a Tune trial, a reporter of its metrics."""
    pool = RayWorkerPool(config)
    try:
        trainer = Trainer(config, executor=pool)  # resumes from a checkpoint via the pool
        local = trainer.planner
        trainer.planner = RemotePlanner(
            config.model_dump_json(),
            trainer.variance_scale,
            trainer.checkpoint_dir,
            local.state(),
            local.stats,
            trainer.global_step,
        )
    except BaseException:
        pool.close()
        raise
    if in_tune_session():
        trainer.callbacks.append(TuneReporter())
    return trainer


class RayWorkerPool:
    """The Executor of ``fqa.executor`` on QueryWorker actors."""

    def __init__(self, config: Config) -> None:
        self.config = config
        cc = config.cluster
        check_data(config)  # bad data fails here, before Ray starts
        self._owns_ray = connect()
        self.workers: list[ray.actor.ActorHandle] = []
        try:
            require_resources(cc.num_workers, cc.cpus_per_worker, cc.gpus_per_worker)
        except ClusterResourceError:
            self.close()
            raise
        self.estimator = configured_estimator(config)  # reduces results; needs no model
        worker_class = remote_worker_class(cc.cpus_per_worker, cc.gpus_per_worker, _MAX_RESTARTS)
        threads = max(1, int(cc.cpus_per_worker))
        config_json = config.model_dump_json()
        self.workers = [worker_class.remote(config_json, threads) for _ in range(cc.num_workers)]
        self.dirty: set[int] = set()  # replicas to resync from a healthy worker
        self.lost: set[int] = set()  # restarted workers, rebuilt from the checkpoint + log
        self.dead: set[int] = set()  # out of restarts: dropped
        # each step's update as broadcast since the last checkpoint: with that checkpoint
        # (or, before the first one, the config's initial replica), all a restarted
        # worker needs to rebuild its replica
        self.updates: list[tuple[int, Update, int]] = []
        self.update_bytes = 0  # tensor bytes held by self.updates
        self.log_complete = True  # False once the log was dropped for its size
        self.checkpoint: Path | None = None
        self.applied_step = -1  # the last step every replica holds
        # bumped when a worker is rebuilt or resynced, so failures of calls sent to its
        # previous instance (several shards in flight) do not rebuild it again
        self.generation = [0] * len(self.workers)
        self.rebuilt = 0  # restarted workers rebuilt from checkpoint + updates
        self.resyncs = 0  # checksum mismatches repaired
        self.redispatched = 0  # shards re-run after their worker died
        self.hung = 0  # workers killed for holding work past cluster.shard_timeout_s
        self.duplicates = 0  # shard results for an already answered (step, shard) key
        self.result_bytes: list[int] = []  # pickled shard results returned per step
        self.driver_bytes: list[int] = []  # results in + the update out, per step
        self.collective_retries = 0  # steps re-run after their all-reduce failed
        # lr: where each shard's partial sums are held this step, and the group they
        # are all-reduced in (rebuilt when its members change)
        self._shards: list[Shard] = []
        self._owners: list[tuple[int, int] | None] = []
        self._group_epoch = 0
        self._group_members: tuple[tuple[int, int], ...] | None = None
        self.replica_checksums: list[str] = []  # the workers' checksums at the end of fit
        self.keep_parameters = False  # tests: fetch rank 0's parameters at the end of fit
        self.final_parameters: torch.Tensor | None = None
        # tests inject faults here: called once per step after the shards are dispatched,
        # and (apply_hook) before an update whose sums the workers add goes out
        self.fault_hook: Callable[[RayWorkerPool, int], None] | None = None
        self.apply_hook: Callable[[RayWorkerPool, int], None] | None = None
        self._last: dict[str, Any] = {}
        self._await_workers()
        self._describe = ray.get(self.workers[0].describe.remote())
        self._align()

    # ---- the executor interface -------------------------------------------------------
    def train_ids(self) -> np.ndarray:
        return np.array(self._describe["train_ids"])

    def variance_scale(self) -> float:
        return float(self._describe["variance_scale"])

    def primary_metric(self) -> str:
        return self._describe["primary_metric"]

    def trainable_count(self) -> int:
        """Trainable parameters of a replica (reports; the driver holds none)."""
        return int(self._describe["trainable_count"])

    def prepass(self, step: int, ids: np.ndarray) -> dict[str, np.ndarray]:
        while True:  # on one worker, rotating; retried on another if it dies
            live = self._live()
            index = live[step % len(live)]
            prepass = self._get(index, self.workers[index].prepass.remote(ids, step))
            if prepass is not None:
                return prepass

    def evaluate(self, step: int, shards: list[Shard]) -> list[ShardResult]:
        """On the workers (cluster.dispatch); results in plan order, each exactly once."""
        ledger = evaluate_on_workers(self, step, shards)
        self.duplicates += ledger.duplicates
        results = ledger.results
        self._shards, self._owners = shards, ledger.owners
        self.result_bytes.append(sum(len(pickle.dumps(r)) for r in results))
        # the step's idempotency keys: shards planned, results accepted, duplicates ignored
        self._last = {"shards": len(shards), "shards_applied": len(results)}
        return results  # type: ignore[return-value]

    def apply(self, step: int, update: Update, prepass_nonfinite: int) -> UpdateOutcome:
        """Every worker replays the update; a worker lost meanwhile is rebuilt from the
        log (which holds this update) before its next call. An update whose partial sums
        stayed on the workers is finished there, over their collective group."""
        self.driver_bytes.append(self.result_bytes[-1] + len(pickle.dumps(update)))
        if update.pending:
            outcome = self._apply_held(step, update, prepass_nonfinite)
        else:
            outcome = self._apply_everywhere(step, update, prepass_nonfinite)
        self.applied_step = step
        if (step + 1) % self.config.cluster.checksum_every == 0:
            self.verify_replicas()
        self._last.update(resyncs=self.resyncs, redispatched=self.redispatched, hung=self.hung)
        self._last.update(duplicates=self.duplicates, result_bytes=self.result_bytes[-1])
        self._last.update(
            driver_bytes=self.driver_bytes[-1], collective_retries=self.collective_retries
        )
        return outcome

    def _apply_everywhere(self, step: int, update: Update, prepass_nonfinite: int) -> UpdateOutcome:
        update_ref = ray.put(update)  # one upload, shared by all workers
        refs = {
            i: self.workers[i].apply.remote(step, update_ref, prepass_nonfinite)
            for i in self._live()
        }
        self._log_update(step, update, prepass_nonfinite)  # after _live()
        outcomes = [self._get(index, ref) for index, ref in refs.items()]
        outcome = next((o for o in outcomes if o is not None), None)
        while outcome is None:  # every replica was lost mid-update: ask a rebuilt one
            index = self._live()[0]
            outcome = self._get(index, self.workers[index].last_outcome.remote())
        return outcome

    def _apply_held(self, step: int, update: Update, prepass_nonfinite: int) -> UpdateOutcome:
        """The workers all-reduce the sums they hold (exactly: fqa.exact_sum) and apply.
        If a member is lost before the sum completes, nothing was applied anywhere: its
        shards run again on the live workers and the step re-runs on a rebuilt group.
        The update enters the log once some replica holds it, so a worker rebuilt later
        replays it alone (evaluating the step's shards itself: the same bits)."""
        update_ref = ray.put(update)  # the shards, no tensors
        while True:
            live = self._live()
            members = {(i, self.generation[i]) for i in live}
            lost = [j for j, owner in enumerate(self._owners) if owner not in members]
            if lost:  # their sums went with a lost worker (or its previous instance)
                ledger = evaluate_on_workers(
                    self, step, [self._shards[j] for j in lost], indices=lost, hook=False
                )
                for j, owner in zip(lost, ledger.owners, strict=True):
                    self._owners[j] = owner
                self.redispatched += len(lost)
                continue  # a worker may have been lost meanwhile
            epoch = self._group(live)
            if epoch is None:
                continue
            if self.apply_hook is not None:
                self.apply_hook(self, step)
            refs = {
                i: self.workers[i].apply.remote(
                    step, update_ref, prepass_nonfinite, self._held_by(i), epoch
                )
                for i in live
            }
            outcomes, incomplete = {}, []
            for index, ref in refs.items():
                try:
                    # past the group's own timeout, so a member left waiting on a lost
                    # one reports the failed all-reduce before it is taken for hung
                    outcomes[index] = ray.get(ref, timeout=2 * self.config.cluster.shard_timeout_s)
                except CollectiveError:
                    incomplete.append(index)
                except GetTimeoutError:
                    self._hung(index, "no answer to an all-reduce")
                except (RayActorError, ReplicaBehind):
                    self._lost(index)
            done = [o for o in outcomes.values() if o is not None]
            if incomplete or len(outcomes) < len(refs):
                self._group_members = None  # rebuild the group before the next collective
            if done:  # the sum completed: the step is in those replicas
                self._log_update(step, update, prepass_nonfinite)
                self.dirty |= set(incomplete)  # resynced from one that holds the step
                return done[0]
            self.collective_retries += 1
            log.warning(
                "step %d: the workers' all-reduce did not complete (%d of %d answered); "
                "re-running it on a rebuilt group",
                step,
                len(outcomes) - len(incomplete),
                len(refs),
            )

    def _held_by(self, index: int) -> list[int]:
        return [j for j, owner in enumerate(self._owners) if owner[0] == index]

    def _group(self, live: list[int]) -> int | None:
        """The collective group of the live workers (rank = position), rebuilt under a
        new epoch when its members changed; None if a member failed meanwhile."""
        members = tuple((i, self.generation[i]) for i in live)
        if members == self._group_members:
            return self._group_epoch
        self._group_epoch += 1
        epoch, timeout = self._group_epoch, self.config.cluster.shard_timeout_s
        address = self._get(
            live[0], self.workers[live[0]].open_group.remote(epoch, len(live), timeout)
        )
        if address is None:
            return None
        refs = {
            i: self.workers[i].join_group.remote(epoch, rank, len(live), *address, timeout)
            for rank, i in enumerate(live)
        }
        formed = True
        for index, ref in refs.items():
            try:
                ray.get(ref, timeout=timeout)
            except CollectiveError:
                formed = False
            except GetTimeoutError:
                self._hung(index, "no answer while forming the collective group")
                formed = False
            except (RayActorError, ReplicaBehind):
                self._lost(index)
                formed = False
        if not formed:
            return None
        self._group_members = members
        log.info("collective group epoch %d: workers %s", epoch, list(live))
        return epoch

    def evaluate_split(self, split: str) -> dict[str, float]:
        while True:  # on rank 0, the first live worker
            index = self._live()[0]
            call = self.workers[index].evaluate_split.remote(split, self.applied_step + 1)
            metrics = self._get(index, call)
            if metrics is not None:
                return metrics

    def save_checkpoint(
        self, directory: Path, step: int, stats: DatapointStats, state: dict[str, Any]
    ) -> Path:
        """Rank 0 writes (fqa.checkpoint: atomic, checksummed); if it dies meanwhile the
        next live worker rewrites the same step, which replaces any copy atomically."""
        while True:
            index = self._live()[0]
            call = self.workers[index].save_checkpoint.remote(str(directory), step, stats, state)
            path = self._get(index, call, _START_TIMEOUT_S)
            if path is not None:
                break
        self.checkpoint = location(path)  # it holds every update so far
        self.updates, self.update_bytes, self.log_complete = [], 0, True
        return self.checkpoint

    def restore(self, path: Path, check: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        live = self._live()
        state = ray.get(self.workers[live[0]].read_state.remote(str(path)))  # verified there
        check(state)
        ray.get([self.workers[i].restore.remote(str(path), []) for i in live])
        self.checkpoint = path
        self.updates, self.update_bytes, self.log_complete = [], 0, True
        self.applied_step = int(state["step"]) - 1
        return state

    def step_metrics(self) -> dict[str, Any]:
        return dict(self._last)

    def summary(self) -> dict[str, Any]:
        self.replica_checksums = self.verify_replicas()
        if self.keep_parameters:
            index = self._live()[0]
            self.final_parameters = ray.get(self.workers[index].parameters.remote())
        return {
            "workers": len(self.workers),
            "resyncs": self.resyncs,
            "redispatched": self.redispatched,
            "hung": self.hung,
            "duplicates": self.duplicates,
        }

    def close(self) -> None:
        for handle in self.workers:
            ray.kill(handle)
        self.workers = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    # ---- replicas ---------------------------------------------------------------------
    def verify_replicas(self) -> list[str]:
        """Compare the workers' parameter checksums; resync any that differ from the
        majority (ties: the lowest rank) from a worker that agrees with it."""
        sums = self._replicas(self._live())
        if sums:
            counts = Counter(sums.values())
            first = {value: min(i for i in sums if sums[i] == value) for value in counts}
            expected = max(counts, key=lambda value: (counts[value], -first[value]))
            for index, value in sums.items():
                if value != expected:
                    log.warning(
                        "worker %d's parameters differ from the other replicas' after step %d; "
                        "resyncing",
                        index,
                        self.applied_step,
                    )
                    self.resyncs += 1
                    self.dirty.add(index)
        self._live()
        return list(sums.values())

    def _align(self) -> None:
        """Workers built from one config start bit-identical; any that does not (e.g. a
        nondeterministic initialiser) takes rank 0's replica."""
        sums = self._replicas(range(len(self.workers)))
        self.dirty |= {i for i, value in sums.items() if value != sums[min(sums)]}
        self._live()

    def _replicas(self, indices) -> dict[int, str]:
        """The checksums of the workers among ``indices`` that hold every update so far;
        one that answers from another step was restarted unnoticed: it is marked lost."""
        refs = {i: self.workers[i].replica.remote() for i in indices}
        sums = {}
        for index, ref in refs.items():
            value = self._get(index, ref)
            if value is None:
                continue
            step, checksum = value
            if step != self.applied_step:
                self._lost(index)
                continue
            sums[index] = checksum
        return sums

    def _await_workers(self) -> None:
        refs = [w.ready.remote() for w in self.workers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=_START_TIMEOUT_S)
        if len(ready) < len(refs):
            self.close()
            raise ClusterResourceError(
                f"only {len(ready)} of {len(refs)} workers started within {_START_TIMEOUT_S:.0f}s; "
                f"available resources: {ray.available_resources()} (other jobs may hold them)"
            )
        try:
            ray.get(ready)  # surface a worker's start-up exception (bad data dir, model name)
        except BaseException:
            self.close()
            raise

    def _live(self) -> list[int]:
        """Workers able to take work now. A restarted one is first rebuilt from the last
        checkpoint plus the updates since; when the log was dropped, or the rebuild
        fails, it is resynced from a healthy worker (as is one whose checksum differed)."""
        while True:
            while self.lost - self.dead:  # a rebuild may find another worker restarted
                index = min(self.lost - self.dead)
                self.lost.discard(index)
                if self.log_complete and self._rebuild(index):
                    continue
                if actor_is_dead(self.workers[index]):
                    log.warning("worker %d is gone for good; continuing without it", index)
                    self.dead.add(index)
                else:
                    self.dirty.add(index)
            dirty = sorted(self.dirty - self.dead)
            if not dirty:
                break
            healthy = list(self._replicas([i for i in self._alive() if i not in self.dirty]))
            if self.lost - self.dead:
                continue  # restarted workers found: rebuild them first
            if not healthy:
                if self._alive():
                    raise ClusterError(
                        "no worker holds a valid replica to resync from (every replica was "
                        "lost after the update log outgrew its cap); rerun the job to resume "
                        "from the checkpoint"
                    )
                break
            state = self.workers[healthy[0]].state.remote()  # worker to worker
            for index in dirty:
                if not self._resync(index, state):
                    log.warning("worker %d is gone for good; continuing without it", index)
                    self.dead.add(index)
            self.dirty.clear()
            break
        live = self._alive()
        if not live:
            raise ClusterError("every worker died; rerun the job to resume from the checkpoint")
        return live

    def _alive(self) -> list[int]:
        return [i for i in range(len(self.workers)) if i not in self.dead]

    def _resync(self, index: int, state: ray.ObjectRef) -> bool:
        """Load a healthy worker's state into worker ``index``, waiting while Ray restarts
        it (calls fail with RayActorError until the new instance is up)."""
        worker = self.workers[index]
        done, _ = self._call_while_restarting(
            index, lambda: worker.load_replica.remote(state, self.applied_step + 1)
        )
        if done:
            self.generation[index] += 1
        return done

    def _rebuild(self, index: int) -> bool:
        worker = self.workers[index]
        checkpoint = None if self.checkpoint is None else str(self.checkpoint)
        done, value = self._call_while_restarting(
            index, lambda: worker.restore.remote(checkpoint, self.updates)
        )
        if not done:
            return False
        others = [i for i in self._alive() if i not in self.lost | self.dirty | {index}]
        sums = self._replicas(others)  # their restarts, if any, are found here
        if sums and value[0] != sums[min(sums)]:
            log.warning(
                "worker %d rebuilt from %s differs from worker %d", index, checkpoint, min(sums)
            )
            return False
        self.rebuilt += 1
        self.generation[index] += 1
        log.info("worker %d rebuilt from %s + %d updates", index, checkpoint, len(self.updates))
        return True

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

    def _hung(self, index: int, why: str) -> None:
        """Kill a worker that stopped answering; Ray restarts it and _live() rebuilds it."""
        log.warning("worker %d is hung (%s); restarting it", index, why)
        self.hung += 1
        ray.kill(self.workers[index], no_restart=False)
        self.lost.add(index)

    def _get(self, index: int, ref: ray.ObjectRef, timeout: float | None = None) -> Any:
        """A worker call's result within cluster.shard_timeout_s; None if the worker died
        or hung (it is then rebuilt before its next call)."""
        limit = timeout or self.config.cluster.shard_timeout_s
        try:
            return ray.get(ref, timeout=limit)
        except GetTimeoutError:
            self._hung(index, f"no answer within {limit:g}s")
        except (RayActorError, ReplicaBehind):
            self._lost(index)
        return None

    def _lost(self, index: int, generation: int | None = None) -> None:
        if generation is not None and generation != self.generation[index]:
            return  # a call to the instance that was already replaced
        log.warning("worker %d died; it restarts and rebuilds its replica", index)
        self.lost.add(index)

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


class TuneReporter:
    """Inside a Tune trial, each evaluation's metrics (and each checkpoint) go to Tune."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._report()  # the previous step's, if it carried an evaluation
        self._pending = metrics

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        self._report(path)

    def on_finish(self, trainer: Trainer) -> None:
        self._report()

    def _report(self, checkpoint_dir: Path | None = None) -> None:
        if self._pending is None:
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


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v.item() if isinstance(v, np.generic) else v for k, v in metrics.items()}
