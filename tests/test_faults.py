"""Fault injection on a real Ray instance: each fault costs time, never data.

Every run with a fault is compared with the fault-free cluster run of the same seed:
the same final parameters (bit for bit) and query count, every step index exactly once
in the metrics with each of its shards applied exactly once, every replica's parameter
hash equal (the driver holds no replica), and afterwards no actor or resource left
behind. The
faults and their outcomes are printed as a table at the end of the module.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fqa.checkpoint import latest_checkpoint, load_checkpoint

ray = pytest.importorskip("ray")

from cluster.dispatch import StepLedger  # noqa: E402
from cluster.driver import ClusterTrainer  # noqa: E402

pytestmark = [pytest.mark.faults, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
_OUTCOMES: list[tuple[str, str]] = []  # (fault, outcome) for the table
_REFERENCE: dict[str, dict] = {}  # the fault-free run, computed once per module


@pytest.fixture(scope="module", autouse=True)
def fault_table(request):
    yield
    if not _OUTCOMES:
        return
    width = max(len(fault) for fault, _ in _OUTCOMES)
    lines = ["", f"{'fault injected':<{width}}  outcome", f"{'-' * width}  {'-' * 60}"]
    lines += [f"{fault:<{width}}  {outcome}" for fault, outcome in _OUTCOMES]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown even without -s
        print("\n".join(lines), flush=True)


def _config(tiny_config, name: str, **cluster):
    return tiny_config(
        run={"name": name},
        estimator={"name": "lr", "shard_rows": 4},  # 8 shards a step, 4 per worker
        allocator={"name": "gaussian"},  # learned allocator state must survive too
        train={"steps": STEPS, "checkpoint_every": 2, "eval_every": STEPS},
        cluster={"checksum_every": 1, **cluster},  # replica hashes compared every step
    )


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final(run_dir: Path) -> dict:
    data = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    return {"allocator": data.state["allocator"], "step": data.state["step"]}


def _params(trainer) -> str:
    """The final parameters, as the replicas' common sha256: equal iff bit-identical."""
    checksums = trainer.executor.replica_checksums
    assert len(checksums) == 2 and len(set(checksums)) == 1, checksums
    return checksums[0]


def reference(tiny_config) -> dict:
    if not _REFERENCE:
        trainer = ClusterTrainer(_config(tiny_config, "reference"))
        trainer.fit()
        _REFERENCE.update(
            params=_params(trainer),
            queries=trainer.queries,
            records=_records(trainer.run_dir),
            final=_final(trainer.run_dir),
        )
        _no_leaks()
    return _REFERENCE


def _no_leaks(settle_s: float = 120.0) -> None:
    """No QueryWorker/AllocatorActor alive, and every resource back in the pool."""
    from ray._private.state import actors

    deadline = time.monotonic() + settle_s
    while True:
        alive = [
            a["ActorClassName"]
            for a in actors().values()
            if a["State"] != "DEAD" and a["ActorClassName"] in ("QueryWorker", "AllocatorActor")
        ]
        total, free = ray.cluster_resources(), ray.available_resources()
        held = {
            k: (v, free.get(k, 0.0))
            for k, v in total.items()
            if not k.startswith("node:") and abs(v - free.get(k, 0.0)) > 1e-6
        }
        if not alive and not held:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"leaked after the run: actors {alive}, resources (total, free) {held}")
        time.sleep(0.5)


def _nothing_lost(trainer_params: str, queries: int, run_dir: Path, ref: dict) -> str:
    assert trainer_params == ref["params"], "final parameters differ"
    assert queries == ref["queries"]
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(STEPS)), "a step is missing or repeated"
    for ours, theirs in zip(records, ref["records"], strict=True):
        assert ours["queries"] == theirs["queries"]
        assert ours["shards_applied"] == ours["shards"] == theirs["shards"]  # each key once
        assert ours["loss"] == theirs["loss"]
    assert _final(run_dir) == ref["final"]  # allocator state: every learn call once
    _no_leaks()
    return f"completed: same params and {queries} queries; steps 0-{STEPS - 1} once each"


def _hook(trainer, hook) -> None:
    """Call ``hook(trainer, step)`` once per step, after the step's shards went out."""
    trainer.executor.fault_hook = lambda pool, step: hook(trainer, step)


def _run_with(tiny_config, name: str, hook, **cluster):
    trainer = ClusterTrainer(_config(tiny_config, name, **cluster))
    _hook(trainer, hook)
    trainer.fit()
    _params(trainer)  # every replica bit-identical
    return trainer


def test_the_fault_free_run_leaks_nothing(ray_cluster, tiny_config):
    ref = reference(tiny_config)
    assert [r["step"] for r in ref["records"]] == list(range(STEPS))
    assert all(r["duplicates"] == 0 and r["hung"] == 0 for r in ref["records"])


def test_a_worker_killed_mid_shard(ray_cluster, tiny_config):
    ref = reference(tiny_config)

    def kill(trainer, step):
        if step == 3:  # after the step-2 checkpoint, shards in flight on both workers
            ray.kill(trainer.executor.workers[0], no_restart=False)

    trainer = _run_with(tiny_config, "kill-one", kill)
    pool = trainer.executor
    assert pool.redispatched > 0 and pool.rebuilt == 1
    outcome = _nothing_lost(_params(trainer), trainer.queries, trainer.run_dir, ref)
    _OUTCOMES.append(
        ("QueryWorker killed mid-shard", f"{outcome}; {pool.redispatched} shards re-run")
    )


def test_two_workers_killed_at_once(ray_cluster, tiny_config):
    ref = reference(tiny_config)

    def kill(trainer, step):
        if step == 3:
            for worker in trainer.executor.workers:
                ray.kill(worker, no_restart=False)

    trainer = _run_with(tiny_config, "kill-two", kill)
    assert trainer.executor.rebuilt == 2
    outcome = _nothing_lost(_params(trainer), trainer.queries, trainer.run_dir, ref)
    _OUTCOMES.append(("both QueryWorkers killed at once", f"{outcome}; both rebuilt"))


def test_a_worker_lost_mid_all_reduce(ray_cluster, tiny_config):
    """Worker 1 waits in the all-reduce of lr's partial sums while worker 0, which was
    to join it, is killed: nothing is applied anywhere, the lost worker's shards run
    again, and the step re-runs on a rebuilt group — same bits, every query once."""
    import threading

    ref = reference(tiny_config)
    trainer = ClusterTrainer(_config(tiny_config, "kill-all-reduce"))
    pool = trainer.executor

    def kill_while_the_group_waits(pool, step):
        if step != 3 or pool.collective_retries:
            return
        victim = pool.workers[0]
        # worker 0 is busy, so its share never arrives while worker 1 waits for it
        victim.__ray_call__.remote(lambda worker: time.sleep(3))
        threading.Timer(1.5, lambda: ray.kill(victim, no_restart=False)).start()

    pool.apply_hook = kill_while_the_group_waits
    trainer.fit()
    assert pool.collective_retries == 1 and pool.rebuilt == 1
    outcome = _nothing_lost(_params(trainer), trainer.queries, trainer.run_dir, ref)
    _OUTCOMES.append(
        ("QueryWorker lost mid-all-reduce", f"{outcome}; step re-run on a rebuilt group")
    )


class _RestartBetweenSteps:
    """A trainer callback: after step 2, worker 0 is killed and Ray's fresh instance
    (the config's initial replica) is awaited, so no call of the run ever fails."""

    def on_step(self, trainer, metrics) -> None:
        if metrics["step"] != 2:
            return
        worker = trainer.executor.workers[0]
        ray.kill(worker, no_restart=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                ray.get(worker.ready.remote(), timeout=30)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                time.sleep(0.5)
        pytest.fail("Ray did not restart the worker")


def test_a_worker_restarted_unnoticed_between_steps(ray_cluster, tiny_config):
    """Its fresh instance refuses work for a step it has not reached, and is rebuilt
    rather than trusted (its shards would otherwise run on the initial parameters)."""
    ref = reference(tiny_config)
    trainer = ClusterTrainer(_config(tiny_config, "restarted-unnoticed"))
    trainer.callbacks.append(_RestartBetweenSteps())
    trainer.fit()
    _params(trainer)  # every replica bit-identical
    assert trainer.executor.rebuilt == 1
    outcome = _nothing_lost(_params(trainer), trainer.queries, trainer.run_dir, ref)
    _OUTCOMES.append(("QueryWorker restarted unnoticed between steps", f"{outcome}; rebuilt"))


def test_the_allocator_actor_killed(ray_cluster, tiny_config):
    ref = reference(tiny_config)

    def kill(trainer, step):
        if step == 3:  # step 2 was learned since the checkpoint: it must be replayed
            ray.kill(trainer.planner.actor, no_restart=False)

    trainer = _run_with(tiny_config, "kill-allocator", kill)
    assert trainer.planner.restores == 1
    outcome = _nothing_lost(_params(trainer), trainer.queries, trainer.run_dir, ref)
    _OUTCOMES.append(("AllocatorActor killed", f"{outcome}; restored once"))


def test_every_worker_lost_for_good_stops_with_a_valid_checkpoint(ray_cluster, tiny_config):
    """No restarts left: the run stops with a clear error; rerunning it resumes from the
    last checkpoint to the fault-free result."""
    from cluster.driver import ClusterError

    ref = reference(tiny_config)
    config = _config(tiny_config, "all-lost")

    def kill_for_good(trainer, step):
        if step == 3:
            for worker in trainer.executor.workers:
                ray.kill(worker, no_restart=True)

    trainer = ClusterTrainer(config)
    _hook(trainer, kill_for_good)
    with pytest.raises(ClusterError, match="every worker died; rerun the job to resume"):
        trainer.fit()
    last = latest_checkpoint(trainer.run_dir / "checkpoints")
    assert last.name == "step-000002"
    load_checkpoint(last)  # valid: every checksum verifies
    del trainer  # the failed driver's objects go (as its process would)
    gc.collect()
    _no_leaks()
    resumed = ClusterTrainer(config)
    resumed.fit()
    outcome = _nothing_lost(_params(resumed), resumed.queries, resumed.run_dir, ref)
    _OUTCOMES.append(
        (
            "both QueryWorkers lost for good",
            f"stopped: ClusterError, step-000002 valid; rerun {outcome}",
        )
    )


def test_a_hung_worker_times_out_and_its_shards_are_re_dispatched(ray_cluster, tiny_config):
    ref = reference(tiny_config)

    def hang(trainer, step):
        if step == 3:  # queued behind its current shards: the next ones never start
            trainer.executor.workers[0].__ray_call__.remote(lambda worker: time.sleep(3600))

    trainer = _run_with(tiny_config, "hung", hang, shard_timeout_s=20)
    pool = trainer.executor
    assert pool.hung == 1 and pool.redispatched > 0 and pool.rebuilt == 1
    outcome = _nothing_lost(_params(trainer), trainer.queries, trainer.run_dir, ref)
    _OUTCOMES.append(
        ("QueryWorker hangs (shard timeout 20 s)", f"{outcome}; killed, shards re-run")
    )


def test_duplicate_deliveries_are_applied_once(ray_cluster, tiny_config):
    """Ray's retries are at-least-once: a second delivery of an update, or of a learn
    call, must change nothing (idempotency keys on the worker and the actor)."""
    ref = reference(tiny_config)
    ignored = {}

    def deliver_twice(trainer, step):
        if step == 3:
            worker = trainer.executor.workers[0]
            assert ray.get(worker.apply.remote(*trainer.executor.updates[-1])) is None  # step 2
            ignored["worker"] = ray.get(worker.__ray_call__.remote(lambda w: w.duplicates))
            actor = trainer.planner.actor
            assert ray.get(actor.learn.remote(*trainer.planner._learned[-1])) == {}
            ignored["allocator"] = ray.get(actor.duplicates_ignored.remote())

    trainer = _run_with(tiny_config, "duplicates", deliver_twice)
    assert ignored == {"worker": 1, "allocator": 1}
    outcome = _nothing_lost(_params(trainer), trainer.queries, trainer.run_dir, ref)
    _OUTCOMES.append(("update + learn call delivered twice", f"{outcome}; both duplicates ignored"))


def test_a_shard_result_is_accepted_once_per_key():
    ledger = StepLedger(step=5, size=2)
    assert ledger.accept(5, 0, "first") and not ledger.accept(5, 0, "second")
    assert ledger.results == ["first", None] and ledger.duplicates == 1 and not ledger.complete()
    with pytest.raises(ValueError, match="step 4 offered to the ledger of step 5"):
        ledger.accept(4, 1, "stale")


_DRIVER = """
import json, os, sys, time
from pathlib import Path
import ray
from cluster.driver import ClusterTrainer
from fqa.config import parse_config

config = parse_config(json.loads(Path(sys.argv[1]).read_text()))
mode, marker, at = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])

def pause():
    marker.write_text(str(os.getpid()))
    time.sleep(3600)

def pause_in_checkpoint(worker):
    # in the worker: rank 0 writes the checkpoint there, and stops half-way through
    import fqa.checkpoint as checkpoint
    save_file = checkpoint.save_file
    def pausing_save_file(tensors, path, *args, **kwargs):
        save_file(tensors, path, *args, **kwargs)
        if f"step-{at:06d}" in path and path.endswith("model.safetensors"):
            pause()  # model written, the rest of the checkpoint not yet
    checkpoint.save_file = pausing_save_file

trainer = ClusterTrainer(config)
if mode == "checkpoint":
    ray.get([w.__ray_call__.remote(pause_in_checkpoint) for w in trainer.executor.workers])
step = trainer.step
def paused_step():
    if mode == "between" and trainer.global_step == at:
        pause()
    return step()
trainer.step = paused_step
trainer.fit()
"""


def _kill_driver(ray_cluster, config, tmp_path: Path, mode: str, at: int) -> None:
    """Run the driver in its own process on this cluster, SIGKILL it at the marked
    moment (between steps, or while its rank-0 worker is half-way through writing a
    checkpoint), and leave its run directory as a crash would."""
    path = tmp_path / f"{mode}.json"
    path.write_text(json.dumps(config.model_dump(mode="json")))
    marker = tmp_path / f"{mode}.paused"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"]["gcs_address"]}
    log = open(tmp_path / f"{mode}.log", "w")
    command = [sys.executable, "-c", _DRIVER, str(path), mode, str(marker), str(at)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 400
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"driver never paused:\n{(tmp_path / f'{mode}.log').read_text()[-3000:]}")
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    log.close()


@pytest.mark.parametrize(
    ("mode", "at", "fault"),
    [
        ("between", 3, "driver SIGKILLed between steps 2 and 3"),
        ("checkpoint", 4, "driver SIGKILLed while rank 0 writes checkpoint 4"),
    ],
)
def test_a_killed_driver_resumes_to_the_same_result(
    ray_cluster, tiny_config, tmp_path, mode, at, fault
):
    ref = reference(tiny_config)
    config = _config(tiny_config, f"driver-{mode}")
    _kill_driver(ray_cluster, config, tmp_path, mode, at)
    run_dir = Path(config.run.out_dir) / config.run.name
    last = latest_checkpoint(run_dir / "checkpoints")
    assert last.name == "step-000002"
    load_checkpoint(last)  # valid: every checksum verifies
    _no_leaks()  # the dead driver's actors went with it

    resumed = ClusterTrainer(config)
    assert resumed.global_step == 2
    resumed.fit()
    assert not list((run_dir / "checkpoints").glob(".step-*"))  # no half-written leftovers
    outcome = _nothing_lost(_params(resumed), resumed.queries, run_dir, ref)
    _OUTCOMES.append((fault, f"{outcome}; resumed from step-000002"))


def test_the_soak_job_samples_memory_in_its_quick_mode(ray_cluster, digits_dir, tmp_path, capsys):
    from jobs.soak import main as soak

    code = soak(["--quick", "--out", str(tmp_path), "--data", str(digits_dir)])
    report = json.loads((tmp_path / "soak.json").read_text())
    assert code == (0 if report["within_5_percent"] else 1)
    assert report["summary"]["steps"] == 60 and len(report["samples"]) == 20
    processes = {"driver", "allocator", "worker0", "worker1"}
    assert processes | {"object_store"} <= set(report["growth"])
    for sample in report["samples"]:
        assert all(sample[p] > sample[f"{p}_anon"] > 0 for p in processes)
    assert "growth between the first and the last 10% of 60 steps" in capsys.readouterr().out
    _no_leaks()


_EMBEDDED = """
import json, ray
from cluster.runtime import connect
from ray._private.authentication.authentication_utils import is_token_auth_enabled
owned = connect(num_cpus=1)
info = ray._private.worker.global_worker.node.address_info
print(json.dumps({"owned": owned, "ip": info["node_ip_address"], "webui": info.get("webui_url"),
                  "token": is_token_auth_enabled()}))
ray.shutdown()
"""


def test_the_embedded_ray_instance_is_private(tmp_path):
    """What `python -m jobs.train` starts without RAY_ADDRESS: no dashboard (so no job
    submission API) and Ray's token authentication on, which guards its gRPC ports.
    Ray 2.60 listens on every interface and maps a 127.0.0.1 node address to the host's
    address, so the token, not the bind address, is what keeps others out."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    done = subprocess.run(
        [sys.executable, "-c", _EMBEDDED], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["owned"] and info["token"]
    assert not info["webui"]  # include_dashboard=False: no dashboard, no job submission port
    _OUTCOMES.append(
        ("(security) embedded Ray instance", f"no dashboard, token auth on (node {info['ip']})")
    )
