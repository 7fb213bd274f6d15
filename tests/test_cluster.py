"""The Ray layer against the single-process reference, on the session's real Ray instance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fqa.config import with_overrides
from fqa.trainer import Trainer

ray = pytest.importorskip("ray")

from cluster.driver import ClusterTrainer  # noqa: E402
from cluster.runtime import ClusterResourceError  # noqa: E402
from cluster.worker import parameter_checksum  # noqa: E402
from fqa.executor import InProcessExecutor  # noqa: E402

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]


def _params(trainer: Trainer) -> torch.Tensor:
    """The final parameters: the in-process replica's, or rank 0's as fetched at the end
    of a cluster run (the driver holds none)."""
    if isinstance(trainer.executor, InProcessExecutor):
        return torch.cat([p.detach().flatten() for p in trainer.params])
    return trainer.executor.final_parameters


def _cluster(config) -> Trainer:
    trainer = ClusterTrainer(config)
    trainer.executor.keep_parameters = True
    return trainer


def _replicas_agree(trainer: Trainer) -> None:
    """Every worker's checksum equals rank 0's final parameters' (bit for bit)."""
    expected = parameter_checksum([_params(trainer)])
    assert trainer.executor.replica_checksums == [expected] * 2


def _records(trainer: Trainer) -> list[dict]:
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _config(tiny_config, estimator: str, name: str, **sections):
    sections.setdefault("train", {})
    sections["train"] = {"steps": 4, "checkpoint_every": 2, "eval_every": 2, **sections["train"]}
    return tiny_config(
        run={"name": name},
        estimator={"name": estimator, "shard_rows": 8},  # several shards per worker
        allocator={"name": "gaussian"},
        cluster={"checksum_every": 2},
        **sections,
    )


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The single-process reference run, trained once per estimator for the whole module
    (every comparison below uses the same 4-step config)."""
    out = tmp_path_factory.mktemp("reference")
    runs: dict[str, Trainer] = {}

    def run(tiny_config, estimator: str) -> Trainer:
        if estimator not in runs:
            config = _config(tiny_config, estimator, "reference")
            runs[estimator] = Trainer(with_overrides(config, {"run.out_dir": str(out / estimator)}))
            runs[estimator].fit()
        return runs[estimator]

    return run


# spsa: the reference trainer's own perturb/restore leaves float round-off in θ (the
# workers restore exact bytes), so the two paths agree to round-off, not bit for bit.
_TOLERANCE = {"lr": {"rtol": 1e-6, "atol": 1e-7}, "spsa": {"rtol": 1e-4, "atol": 1e-5}}


@pytest.mark.parametrize("estimator", ["lr", "spsa"])
def test_two_workers_match_the_single_process_trainer(
    ray_cluster, tiny_config, single_process, estimator
):
    reference = single_process(tiny_config, estimator)
    cluster = _cluster(_config(tiny_config, estimator, "cluster"))
    cluster.fit()

    torch.testing.assert_close(_params(cluster), _params(reference), **_TOLERANCE[estimator])
    assert cluster.queries == reference.queries
    ours, theirs = _records(cluster), _records(reference)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == list(range(4))
    for a, b in zip(ours, theirs, strict=True):
        assert a["queries"] == b["queries"]
        assert a["accuracy"] == b["accuracy"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # every worker replica ends bit-identical, with no resync needed
    _replicas_agree(cluster)
    assert cluster.executor.resyncs == 0


@pytest.mark.parametrize("estimator", ["lr", "spsa"])
def test_driver_bytes_per_step_do_not_grow_with_the_model(ray_cluster, tiny_config, estimator):
    """Shard results in, the update out: scalars per sample in both modes (lr's gradient
    sums are all-reduced among the workers and never reach the driver)."""
    from fqa.setup import build_task

    sizes = {}
    for width, depth in [(32, 2), (64, 4)]:
        config = tiny_config(
            run={"name": f"bytes-{estimator}-{width}"},
            model={
                "kwargs": {
                    "img_size": 16,
                    "patch_size": 4,
                    "in_chans": 1,
                    "embed_dim": width,
                    "depth": depth,
                    "num_heads": 2,
                }
            },
            trainable={"mode": "full"},
            estimator={"name": estimator, "shard_rows": 8},
            train={"steps": 2},
        )
        params = sum(p.numel() for _, p in build_task(config).trainable_parameters())
        trainer = ClusterTrainer(config)
        trainer.fit()
        sizes[params] = trainer.executor.driver_bytes
    (small, small_bytes), (large, large_bytes) = sorted(sizes.items())
    assert large > 3 * small  # the two models really differ in size
    assert small_bytes == large_bytes
    samples = 16 * 4 // 2  # batch x queries per datapoint / 2 queries per sample
    print(f"{estimator} driver bytes/step: {sizes} ({small_bytes[0] / samples:.1f} per sample)")
    assert max(small_bytes) / samples < 200  # per-sample scalars plus a per-shard constant


def _model_state_reachable(root, depth: int = 6) -> list[str]:
    """Paths to modules, or tensors of more than 64 elements, reachable from ``root``
    through attributes and containers."""
    found, seen, frontier = [], set(), [("trainer", root)]
    for _ in range(depth):
        following = []
        for path, value in frontier:
            if id(value) in seen or isinstance(value, (str, bytes, type)):
                continue
            seen.add(id(value))
            if isinstance(value, torch.nn.Module) or (
                isinstance(value, torch.Tensor) and value.numel() > 64
            ):
                found.append(path)
                continue
            if isinstance(value, dict):
                following += [(f"{path}[{k!r}]", v) for k, v in value.items()]
            elif isinstance(value, (list, tuple, set)):
                following += [(f"{path}[{i}]", v) for i, v in enumerate(value)]
            elif hasattr(value, "__dict__") and not isinstance(value, ray.actor.ActorHandle):
                following += [(f"{path}.{k}", v) for k, v in vars(value).items()]
        frontier = following
    return found


def test_the_driver_holds_no_model(ray_cluster, tiny_config):
    """Mid-run, nothing the driver's trainer reaches is a model or a parameter-sized
    tensor; evaluation and checkpoints still happen (on rank 0)."""
    cluster = ClusterTrainer(_config(tiny_config, "spsa", "no-model", train={"steps": 2}))
    reached = {}

    def look(pool, step: int) -> None:
        if step == 1:
            reached["mid-run"] = _model_state_reachable(cluster)

    cluster.executor.fault_hook = look
    with pytest.raises(AttributeError):
        cluster.task  # noqa: B018 (the in-process replica's accessor)
    summary = cluster.fit()
    assert reached == {"mid-run": []}
    assert "val_accuracy" in _records(cluster)[-1] and torch.isfinite(
        torch.tensor(summary["test_loss"])
    )
    assert (cluster.run_dir / "checkpoints" / "step-000002" / "manifest.json").is_file()


def test_a_worker_killed_mid_step_loses_no_query(ray_cluster, tiny_config, single_process):
    reference = single_process(tiny_config, "lr")
    cluster = _cluster(_config(tiny_config, "lr", "faulty"))

    def kill_worker_zero(pool, step: int) -> None:
        if step == 1:  # shards are in flight on both workers now
            ray.kill(pool.workers[0], no_restart=False)

    cluster.executor.fault_hook = kill_worker_zero
    cluster.fit()
    assert cluster.executor.redispatched > 0
    assert cluster.queries == reference.queries
    torch.testing.assert_close(_params(cluster), _params(reference), **_TOLERANCE["lr"])
    _replicas_agree(cluster)


def test_a_rerun_driver_resumes_to_the_same_parameters(ray_cluster, tiny_config, single_process):
    reference = single_process(tiny_config, "spsa")
    interrupted = _config(tiny_config, "spsa", "resumed", train={"steps": 2})
    ClusterTrainer(interrupted).fit()  # the driver "dies" after the step-2 checkpoint
    resumed = _cluster(with_overrides(interrupted, {"train.steps": 4}))
    assert resumed.global_step == 2
    resumed.fit()
    torch.testing.assert_close(_params(resumed), _params(reference), **_TOLERANCE["spsa"])
    assert resumed.queries == reference.queries
    assert [r["step"] for r in _records(resumed)] == list(range(4))


@pytest.mark.parametrize(
    ("cluster", "named"),
    [({"num_workers": 3}, "CPU"), ({"num_workers": 1, "gpus_per_worker": 1}, "GPU")],
)
def test_unplaceable_workers_fail_fast_naming_the_resource(
    ray_cluster, tiny_config, cluster, named
):
    with pytest.raises(
        ClusterResourceError, match=rf"requested, but the Ray cluster has .* {named}"
    ):
        ClusterTrainer(tiny_config(cluster=cluster))


@pytest.mark.slow
def test_ray_job_submit_runs_the_job_and_prints_a_summary(ray_cluster, tiny_config, tmp_path):
    config = tiny_config(run={"name": "submitted"}, train={"steps": 2})
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    command = [
        str(Path(sys.executable).with_name("ray")), "job", "submit",
        "--address", ray_cluster["dashboard_url"], "--working-dir", str(REPO), "--",
        sys.executable, "-m", "jobs.train", "--config", str(path), "--workers", "2",
    ]  # fmt: skip
    deadline = time.monotonic() + 180
    while True:  # under load the dashboard's job agent can come up after the instance
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"run"')]
    summary = json.loads(lines[-1])
    assert summary["run"] == "submitted" and summary["steps"] == 2 and summary["workers"] == 2
    assert (Path(config.run.out_dir) / "submitted" / "summary.json").is_file()


def _final_state(trainer: Trainer) -> dict:
    from fqa.checkpoint import latest_checkpoint

    path = latest_checkpoint(trainer.run_dir / "checkpoints")
    return json.loads((path / "state.json").read_text())


@pytest.mark.parametrize("wait", [False, True], ids=["restarting", "restarted"])
def test_a_lost_allocator_actor_is_restored_from_the_checkpoint(
    ray_cluster, tiny_config, single_process, wait
):
    """Killed after the step-2 checkpoint, with step 2 learned since: the restored actor
    (checkpoint statistics + the learn calls since) is exactly the lost one."""
    reference = single_process(tiny_config, "spsa")
    cluster = _cluster(_config(tiny_config, "spsa", "allocator-lost"))

    def kill_allocator(pool, step: int) -> None:
        if step != 3:
            return
        actor = cluster.planner.actor
        ray.kill(actor, no_restart=False)
        while wait:  # let Ray bring up the fresh (empty) instance before the next call
            try:
                ray.get(actor.ping.remote())
                break
            except ray.exceptions.RayActorError:
                pass

    cluster.executor.fault_hook = kill_allocator
    cluster.fit()
    assert cluster.planner.restores == 1
    assert cluster.global_step == 4 and cluster.queries == reference.queries
    ours, theirs = _records(cluster), _records(reference)
    assert [r["step"] for r in ours] == list(range(4))
    for a, b in zip(ours, theirs, strict=True):
        assert a["queries"] == b["queries"]
        assert (a["alloc_min"], a["alloc_max"]) == (b["alloc_min"], b["alloc_max"])
    ours, theirs = _final_state(cluster)["allocator"], _final_state(reference)["allocator"]
    assert ours["step"] == theirs["step"] == 4  # no learn call lost or counted twice
    assert ours["phi"] == pytest.approx(theirs["phi"], rel=1e-4)
    torch.testing.assert_close(_params(cluster), _params(reference), **_TOLERANCE["spsa"])


def test_a_restarted_worker_rebuilds_from_the_checkpoint_and_the_update_log(
    ray_cluster, tiny_config, single_process
):
    """Killed at step 3: the step-2 checkpoint plus step 2's seeded update (per-query
    scalars) rebuild a replica bit-identical to the other's, without a resync."""
    reference = single_process(tiny_config, "spsa")
    cluster = _cluster(_config(tiny_config, "spsa", "rebuilt"))

    resyncs = []  # worker-to-worker resyncs after the kill (the fallback path)

    def kill_worker_zero(pool, step: int) -> None:
        if step == 3:
            assert pool.checkpoint is not None and len(pool.updates) == 1
            original = pool._resync
            pool._resync = lambda i, state: resyncs.append(i) or original(i, state)
            ray.kill(pool.workers[0], no_restart=False)

    cluster.executor.fault_hook = kill_worker_zero
    cluster.fit()
    pool = cluster.executor
    assert pool.rebuilt == 1 and resyncs == [] and pool.resyncs == 0
    assert cluster.queries == reference.queries
    assert [r["step"] for r in _records(cluster)] == list(range(4))
    torch.testing.assert_close(_params(cluster), _params(reference), **_TOLERANCE["spsa"])
    _replicas_agree(cluster)


def test_fqa_train_workers_runs_the_main_job_on_the_cluster(ray_cluster, digits_dir, tmp_path):
    """`fqa train CONFIG --workers 2` inside a running Ray joins it (connect() does not
    start a second instance, nor shut this one down) and trains on 2 QueryWorkers."""
    import yaml

    from jobs.cli import main
    from tests.conftest import TINY_VIT

    config = {
        "run": {"name": "cli-workers", "out_dir": str(tmp_path / "runs")},
        "data": {"dataset": "digits", "dir": str(digits_dir)},
        "model": {"kwargs": TINY_VIT},
        "trainable": {"mode": "head"},
        "estimator": {"name": "spsa"},
        "train": {"steps": 2, "batch_size": 16, "queries_per_datapoint": 4, "progress": False},
        "pretrain": {"enabled": False},
    }
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(config))
    address = ray.get_runtime_context().gcs_address
    assert main(["train", str(path), "--workers", "2", "--no-compare"]) == 0
    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == address
    summary = json.loads((tmp_path / "runs" / "cli-workers" / "summary.json").read_text())
    assert summary["steps"] == 2
    config_used = json.loads((tmp_path / "runs" / "cli-workers" / "config.json").read_text())
    assert config_used["cluster"]["num_workers"] == 2
    records = (tmp_path / "runs" / "cli-workers" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["redispatched"] for r in records] == [0, 0]  # cluster-only metric


def test_backbone_features_workers_build_the_same_task(ray_cluster, tiny_config, tmp_path):
    """The main job's task on 2 workers: each builds its features from the config (the
    cached backbone, the data), and training matches the single-process trainer."""
    from fqa.backprop import with_pretrained

    config = with_pretrained(
        _config(
            tiny_config,
            "lr",
            "features-cluster",
            data={"classes": [5, 6, 7, 8, 9]},
            task={"name": "backbone_features", "feature_block": 0},
            trainable={"mode": "head"},
            pretrain={"enabled": True, "epochs": 1, "cache_dir": str(tmp_path / "cache")},
        )
    )
    reference = Trainer(with_overrides(config, {"run.name": "features-reference"}))
    reference.fit()
    cluster = _cluster(config)
    cluster.fit()
    torch.testing.assert_close(_params(cluster), _params(reference), **_TOLERANCE["lr"])
    assert cluster.queries == reference.queries
    _replicas_agree(cluster)
