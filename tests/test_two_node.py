"""A real two-node Ray cluster on this machine: a head (1 CPU) and a worker node
(2 CPUs), each started with ``ray start`` in its own working and temporary directory,
token authentication on. A ``ray job submit`` training run and a 2-trial sweep run
across them with data, results and checkpoints on the session's S3 server: nothing
may depend on a path only the head has (the repository reaches the nodes only as the
job's uploaded working directory, the data only through the bucket).

Two QueryWorkers of 1 CPU each cannot both fit on the 1-CPU head, so at least one runs
on the worker node by construction; the test also asks Ray where they ran.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fqa.data import SPLITS, prepare_digits
from tests.conftest import TINY_VIT

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
AGENT_WAIT_S = 180  # a loaded machine can take minutes to bring up the dashboard agent


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ray(
    args: list[str], env: dict, cwd: Path, timeout: float = 180
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _node_ports(ports: list[int]) -> list[str]:
    """Every port a node opens, chosen free, so the test never collides with another
    Ray instance on this machine (the defaults 6379, 8265, 10001, ... are shared)."""
    names = (
        "node-manager-port", "object-manager-port", "metrics-export-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
    )  # fmt: skip
    return [f"--{name}={port}" for name, port in zip(names, ports, strict=True)]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, s3_server):
    """Head + worker node; yields the dashboard URL and the client environment."""
    root = tmp_path_factory.mktemp("twonode")
    # short temp dirs: Ray's socket paths must stay under the 107-byte AF_UNIX limit
    temp_head = Path(f"/tmp/fqa2n-h-{secrets.token_hex(3)}")
    temp_worker = Path(f"/tmp/fqa2n-w-{secrets.token_hex(3)}")
    cwd_head, cwd_worker = root / "head", root / "worker"
    for d in (cwd_head, cwd_worker):
        d.mkdir()
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")
    }  # the nodes see the repository only through the job's working_dir
    # our own token in the environment: the shared ~/.ray/auth_token is left untouched
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               RAY_USAGE_STATS_ENABLED="0")  # fmt: skip
    gcs, dashboard, client, *ports = _free_ports(3 + 12)
    head = _ray(
        ["start", "--head", f"--port={gcs}", f"--temp-dir={temp_head}", "--num-cpus=1",
         "--resources", '{"head": 1}', "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", "--disable-usage-stats",
         "--object-store-memory=150000000", *_node_ports(ports[:6])],
        env, cwd_head,
    )  # fmt: skip
    started = [temp_head] if head.returncode == 0 else []
    try:
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        worker = _ray(
            ["start", f"--address=127.0.0.1:{gcs}", f"--temp-dir={temp_worker}",
             "--num-cpus=2", "--resources", '{"worker_node": 1}',
             "--node-ip-address=127.0.0.1", "--disable-usage-stats",
             "--object-store-memory=150000000", *_node_ports(ports[6:])],
            env, cwd_worker,
        )  # fmt: skip
        if worker.returncode == 0:
            started.append(temp_worker)
        assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
        url = f"http://127.0.0.1:{dashboard}"
        _wait_for_job_agent(url, env, cwd_head)
        yield {"url": url, "env": env, "gcs": f"127.0.0.1:{gcs}", "root": root}
    finally:
        # scoped to our nodes: ray stop would end every Ray process of this user
        for temp in reversed(started):
            _stop_node(temp)
        for temp in (temp_head, temp_worker):
            shutil.rmtree(temp, ignore_errors=True)


def _stop_node(temp: Path) -> None:
    """SIGTERM, then SIGKILL, the processes of the node whose temp dir this is: every
    Ray process names it on its command line, so no other Ray instance is touched."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and str(temp) in args and int(proc.name) != os.getpid():
            pids.append(int(proc.name))
    for sig in (15, 9):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == 15:
            time.sleep(3)


def _wait_for_job_agent(url: str, env: dict, cwd: Path) -> None:
    """``ray job submit`` right after ``ray start`` can fail with "No available agent"
    while the dashboard agent comes up; wait (bounded) until the job API answers."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        listed = _ray(["job", "list", "--address", url], env, cwd, timeout=60)
        if listed.returncode == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the job API at {url} never answered: {listed.stderr[-1500:]}")
        time.sleep(3)


def _submit(cluster: dict, working_dir: Path, entrypoint: list[str], s3_env: dict):
    """Submit and wait; retried while the job agent is still unavailable."""
    runtime_env = json.dumps({"env_vars": s3_env})
    args = ["job", "submit", "--address", cluster["url"], "--working-dir", str(working_dir),
            "--runtime-env-json", runtime_env, "--", sys.executable, *entrypoint]  # fmt: skip
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        done = _ray(args, cluster["env"], cluster["root"], timeout=600)
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(5)


@pytest.fixture(scope="module")
def job_dir(two_nodes, s3_server):
    """A copy of the repository without runs/ and data/ (what a user would upload), with
    the configs written into it, and the digits splits uploaded to the bucket."""
    copy = two_nodes["root"] / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "data", "__pycache__", ".pytest_cache", ".ruff_cache"))  # fmt: skip
    staging = two_nodes["root"] / "digits"
    prepare_digits(staging)
    client, bucket = s3_server["client"], s3_server["bucket"]
    for name in (*(f"{s}.parquet" for s in SPLITS), "dataset.json"):
        client.upload_file(str(staging / name), bucket, f"twonode/data/{name}")
    return copy


def _tiny(data_uri: str) -> dict:
    return {
        "data": {"dataset": "digits", "dir": data_uri},
        "model": {"kwargs": TINY_VIT},
        "trainable": {"mode": "head"},
        "estimator": {"name": "lr", "sigma": 0.1},
        "allocator": {"name": "uniform"},
        "train": {"batch_size": 16, "queries_per_datapoint": 4, "progress": False},
    }


def _keys(s3_server: dict, prefix: str) -> set[str]:
    listed = s3_server["client"].list_objects_v2(Bucket=s3_server["bucket"], Prefix=prefix)
    return {item["Key"] for item in listed.get("Contents", [])}


def _query_worker_nodes(cluster: dict) -> set[str]:
    """The node resources of every node a QueryWorker actor ran on (from Ray's state API)."""
    script = (
        "import json\n"
        "from ray.util.state import list_actors, list_nodes\n"
        f"url = {cluster['url']!r}\n"
        "nodes = {n.node_id: sorted(n.resources_total) for n in list_nodes(url, detail=True)}\n"
        "actors = list_actors(url, filters=[('class_name', '=', 'QueryWorker')], limit=1000)\n"
        "print(json.dumps(sorted({r for a in actors for r in nodes[a.node_id]\n"
        "                          if r in ('head', 'worker_node')})))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=cluster["env"], capture_output=True,
                          text=True, timeout=120, cwd=cluster["root"])  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.ray
@pytest.mark.slow
def test_a_submitted_job_trains_across_two_nodes_with_storage_on_s3(two_nodes, job_dir, s3_server):
    bucket = s3_server["bucket"]
    config = {"run": {"name": "two-node", "seed": 0},
              **_tiny(f"s3://{bucket}/twonode/data")}  # fmt: skip
    config["train"].update(steps=4, eval_every=2, checkpoint_every=2)
    (job_dir / "twonode_job.yaml").write_text(yaml.safe_dump(config))
    out = f"s3://{bucket}/twonode/runs"
    done = _submit(
        two_nodes, job_dir,
        ["-m", "jobs.train", "--config", "twonode_job.yaml",
         "--set", f"run.out_dir={out}", "--set", "cluster.num_workers=2"],
        s3_server["env"],
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    summary = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith('{"run"')][-1])
    assert summary["run_dir"] == f"{out}/two-node"
    assert summary["steps"] == 4 and summary["workers"] == 2
    keys = _keys(s3_server, "twonode/runs/two-node/")
    assert {"twonode/runs/two-node/metrics.jsonl",
            "twonode/runs/two-node/summary.json"} <= keys, sorted(keys)  # fmt: skip
    checkpoints = {k for k in keys if k.startswith("twonode/runs/two-node/checkpoints/")}
    assert any("/manifest" in k for k in checkpoints), sorted(keys)
    metrics = s3_server["client"].get_object(
        Bucket=bucket, Key="twonode/runs/two-node/metrics.jsonl"
    )
    steps = [json.loads(line)["step"] for line in metrics["Body"].read().decode().splitlines()]
    assert steps[-1] == 3
    assert "worker_node" in _query_worker_nodes(two_nodes)


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_runs_across_two_nodes_with_storage_on_s3(two_nodes, job_dir, s3_server):
    bucket = s3_server["bucket"]
    sweep = {
        "name": "two-node-sweep",
        "storage": f"s3://{bucket}/twonode/sweeps",
        "config": {
            **_tiny(f"s3://{bucket}/twonode/data"),
            "run": {"out_dir": f"s3://{bucket}/twonode/sweep-runs"},
            "cluster": {"num_workers": 1, "cpus_per_worker": 1},
        },  # fmt: skip
        "space": {"allocator.name": {"grid": ["uniform", "gaussian"]}},
        "total_queries": 384,  # 6 steps of 16 datapoints at 4 queries each
        "evals_per_trial": 2,
        "scheduler": {"name": "none"},
    }
    (job_dir / "twonode_sweep.yaml").write_text(yaml.safe_dump(sweep))
    done = _submit(two_nodes, job_dir, ["-m", "jobs.sweep", "--config", "twonode_sweep.yaml"],
                   s3_server["env"])  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    summary = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith('{"dir"')][-1])
    assert summary["dir"] == f"s3://{bucket}/twonode/sweeps/two-node-sweep"
    assert summary["trials"] == 2 and summary["status"] == {"TERMINATED": 2}
    keys = _keys(s3_server, "twonode/sweeps/two-node-sweep/")
    for name in ("results.parquet", "results.csv", "ranking.md", "curves.png", "best.png"):
        assert f"twonode/sweeps/two-node-sweep/{name}" in keys, sorted(keys)
    body = (
        s3_server["client"]
        .get_object(Bucket=bucket, Key="twonode/sweeps/two-node-sweep/results.csv")["Body"]
        .read()
        .decode()
    )
    assert "gaussian" in body and "uniform" in body
    # both trials (one worker each) fit nowhere but across the nodes: 1 + 2 CPUs
    assert "worker_node" in _query_worker_nodes(two_nodes)


def test_sweep_outputs_are_uploaded_when_the_storage_is_on_s3(s3):
    """write_outputs on an s3:// sweep directory (no Ray: two finished trials' run
    directories put in the bucket by hand) stages its files locally and uploads them."""
    from cluster.sweep_config import parse_sweep
    from cluster.sweep_results import OUTPUTS, write_outputs
    from fqa.storage import location

    raw = {
        "name": "s3-outputs",
        "storage": f"{s3['prefix']}/sweeps",
        "config": {**_tiny(f"{s3['prefix']}/data"), "cluster": {"num_workers": 1}},
        "space": {"allocator.name": {"grid": ["uniform", "gaussian"]}},
        "total_queries": 384,
        "evals_per_trial": 2,
    }
    sweep, base = parse_sweep(raw)
    sweep_dir = location(raw["storage"]) / sweep.name
    grid = []
    for trial, (allocator, accuracy) in enumerate([("uniform", 0.5), ("gaussian", 0.75)]):
        run_dir = sweep_dir / "runs" / f"trial_{trial}"
        config = base.model_dump(mode="json")
        config["allocator"]["name"] = allocator
        config["train"]["steps"] = 2
        (run_dir / "config.json").write_text(json.dumps(config))
        records = [{"step": s, "queries": 64 * (s + 1), "val_accuracy": accuracy} for s in (0, 1)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        grid.append(
            SimpleNamespace(
                path=f"/nowhere/trial_{trial}",
                config={"allocator.name": allocator},
                error=None,
                metrics={"time_total_s": 1.0},
            )
        )
    summary = write_outputs(grid, sweep, base, sweep_dir)
    assert summary["dir"] == str(sweep_dir) and summary["status"] == {"TERMINATED": 2}
    assert summary["best_trial"] == "trial_1" and summary["best_val_accuracy"] == 0.75
    for name in OUTPUTS:
        assert (sweep_dir / name).is_file(), name
    assert "| gaussian | 4 | 0.7500 |" in (sweep_dir / "ranking.md").read_text()
    import pyarrow.parquet as pq

    path, fs = (sweep_dir / "results.parquet").arrow()
    table = pq.read_table(path, filesystem=fs).to_pandas()
    assert sorted(table["allocator"]) == ["gaussian", "uniform"]
