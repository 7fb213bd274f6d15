"""Datasets, run directories and checkpoints on a real S3 server (moto, tests/conftest.py)."""

import json
import logging

import pytest

from fqa.checkpoint import latest_checkpoint, load_checkpoint
from fqa.storage import Remote, StorageError, location
from fqa.trainer import Trainer


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _s3_config(tiny_config, s3, **sections):
    return tiny_config(
        run={"out_dir": f"{s3['prefix']}/runs"},
        data={"dir": f"{s3['prefix']}/digits"},
        **sections,
    )


def test_training_run_on_s3_matches_local(tiny_config, s3, caplog):
    """Data and run directory on S3: the same numbers as on local disk, every output
    object written, and a resume with more steps picks up at the last checkpoint."""
    local = Trainer(tiny_config()).fit()
    remote_config = _s3_config(tiny_config, s3)
    trainer = Trainer(remote_config)
    summary = trainer.fit()
    trainer.storage.plot("t")  # the reporter's plot, uploaded beside the metrics
    run_dir = location(f"{s3['prefix']}/runs/t")
    assert summary["run_dir"] == str(run_dir)
    assert summary["test_loss"] == local["test_loss"]  # storage changes nothing numeric
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png"):
        assert (run_dir / name).is_file(), name
    assert [r["step"] for r in _records((run_dir / "metrics.jsonl").read_text())] == list(range(6))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-000006"
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest", "step-000003", "step-000006"]
    assert (location(f"{s3['prefix']}/digits") / "dataset.json").is_file()

    caplog.set_level(logging.INFO, logger="fqa.trainer")
    longer = Trainer(_s3_config(tiny_config, s3, train={"steps": 9}))
    assert longer.global_step == 6
    assert any("resumed s3://" in r.getMessage() for r in caplog.records)
    longer.fit()
    records = _records((run_dir / "metrics.jsonl").read_text())
    assert [r["step"] for r in records] == list(range(9))  # every step exactly once


def _tear(step_dir: Remote, how: str) -> None:
    if how == "no manifest":  # a driver killed after the files, before the manifest
        (step_dir / "manifest.json").unlink()
    elif how == "torn manifest":
        text = (step_dir / "manifest.json").read_text()
        (step_dir / "manifest.json").write_text(text[: len(text) // 2])
    else:  # a file replaced after its manifest was written: checksum mismatch
        (step_dir / "model.safetensors").write_bytes(b"not the checkpoint")


@pytest.mark.parametrize("how", ["no manifest", "torn manifest", "checksum mismatch"])
def test_incomplete_checkpoint_is_skipped_for_the_previous_one(tiny_config, s3, how, caplog):
    """The newest checkpoint is incomplete: the resume uses the previous complete one
    (a documented recovery with a warning), never the torn one."""
    config = _s3_config(tiny_config, s3)
    Trainer(config).fit()
    checkpoints = location(f"{s3['prefix']}/runs/t/checkpoints")
    _tear(checkpoints / "step-000006", how)
    with caplog.at_level(logging.WARNING, logger="fqa.checkpoint"):
        found = latest_checkpoint(checkpoints)
    assert found == checkpoints / "step-000003"
    assert any("skipping checkpoint" in r.getMessage() for r in caplog.records)
    trainer = Trainer(config)
    assert trainer.global_step == 3
    trainer.fit()  # reruns steps 3..5 and rewrites step 6 completely
    assert load_checkpoint(checkpoints / "step-000006").state["step"] == 6


def test_unreachable_endpoint_is_a_clear_error(tiny_config, s3, monkeypatch):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("FQA_S3_TIMEOUT_S", "1")
    with pytest.raises(StorageError, match=f"cannot reach endpoint http://127.0.0.1:{port}") as err:
        Trainer(tiny_config(run={"out_dir": f"{s3['prefix']}/runs"}))
    assert "AWS_ENDPOINT_URL" in str(err.value)


def test_missing_bucket_is_a_clear_error(tiny_config, s3):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist.*create it"):
        Trainer(tiny_config(run={"out_dir": "s3://no-such-bucket/runs"}))


def test_wrong_credentials_are_a_clear_error(tiny_config, s3, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    key = s3["env"]["AWS_ACCESS_KEY_ID"]
    with pytest.raises(StorageError, match=f"rejected the credentials \\(AWS_ACCESS_KEY_ID='{key}'"):
        Trainer(tiny_config(run={"out_dir": f"{s3['prefix']}/runs"}))


def test_missing_remote_dataset_is_a_clear_error(tiny_config, s3):
    from fqa.data import DataError

    config = tiny_config(data={"dataset": "parquet", "dir": f"{s3['prefix']}/nothing"})
    with pytest.raises(DataError, match="missing split files"):
        Trainer(config)


def test_model_checkpoint_from_s3(tiny_config, s3, tmp_path):
    """model.checkpoint may be a URI; a missing object is the usual CheckpointError."""
    from safetensors.torch import save_file

    from fqa.tasks.models import CheckpointError

    first = Trainer(tiny_config())
    state = {k: v.contiguous() for k, v in first.task.model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    (location(f"{s3['prefix']}/w.safetensors")).upload(tmp_path / "w.safetensors")
    loaded = Trainer(tiny_config(run={"name": "u"}, model={"checkpoint": f"{s3['prefix']}/w.safetensors"}))
    for name, value in loaded.task.model.state_dict().items():
        assert bool((value == state[name]).all()), name
    with pytest.raises(CheckpointError, match="does not exist; check model.checkpoint"):
        Trainer(tiny_config(run={"name": "v"}, model={"checkpoint": f"{s3['prefix']}/none.safetensors"}))


_TRAIN = """
import json, sys
from fqa.config import parse_config
from fqa.trainer import Trainer
Trainer(parse_config(json.loads(sys.argv[1]))).fit()
"""


@pytest.mark.slow
def test_resume_after_the_driver_is_killed_uses_the_last_complete_checkpoint(tiny_config, s3):
    """A driver killed mid-run (SIGKILL, at whatever point it was, possibly mid-upload):
    the resume starts at a complete checkpoint and every step appears once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    config = _s3_config(tiny_config, s3, train={"steps": 200, "checkpoint_every": 2})
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    driver = subprocess.Popen(
        [sys.executable, "-c", _TRAIN, config.model_dump_json()],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    latest = location(f"{s3['prefix']}/runs/t/checkpoints/latest")
    try:
        deadline = time.monotonic() + 300  # a hang guard, not a timing assertion
        while time.monotonic() < deadline and driver.poll() is None:
            if latest.exists() and latest.read_text() >= "step-000004":
                break
            time.sleep(0.2)
        assert driver.poll() is None, driver.communicate()[0][-3000:]
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait()
    resumed = Trainer(_s3_config(tiny_config, s3, train={"steps": 12, "checkpoint_every": 2}))
    assert resumed.global_step >= 4 and resumed.global_step % 2 == 0
    resumed.fit()
    text = location(f"{s3['prefix']}/runs/t/metrics.jsonl").read_text()
    assert [r["step"] for r in _records(text)] == list(range(max(12, resumed.global_step)))


_SWEEP = """
import json, sys
import yaml
from cluster.runtime import connect
from cluster.sweep_config import parse_sweep
from cluster.tune import run_sweep
sweep, base = parse_sweep(yaml.safe_load(sys.argv[1]))
connect(num_cpus=2)
results, sweep_dir = run_sweep(sweep, base)
print(json.dumps({"dir": str(sweep_dir), "errors": results.num_errors,
                  "checkpoints": [str(r.checkpoint.path) for r in results if r.checkpoint]}))
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_two_trial_sweep_with_its_storage_on_s3(digits_dir, s3):
    """Tune's storage_path on S3: experiment state, Tune checkpoints and every trial's
    run directory (metrics, checkpoints, summary) land in the bucket."""
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import TINY_VIT

    raw = {
        "name": "tiny",
        "storage": f"{s3['prefix']}/sweeps",
        "config": {
            "data": {"dataset": "digits", "dir": str(digits_dir)},
            "model": {"kwargs": TINY_VIT},
            "trainable": {"mode": "head"},
            "train": {"batch_size": 16, "queries_per_datapoint": 4, "progress": False},
            "cluster": {"num_workers": 1},
        },
        "space": {"allocator.name": {"grid": ["uniform", "gaussian"]}},
        "scheduler": {"name": "none"},
        "total_queries": 480,
        "evals_per_trial": 2,
    }
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # its own Ray instance, started with the S3 settings
    done = subprocess.run(
        [sys.executable, "-c", _SWEEP, yaml.safe_dump(raw)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["errors"] == 0 and report["dir"] == f"{s3['prefix']}/sweeps/tiny"
    sweep_dir = location(report["dir"])
    assert any(p.name.startswith("experiment_state") for p in sweep_dir.iterdir())
    assert len(report["checkpoints"]) == 2
    assert all(c.startswith(sweep_dir.path) for c in report["checkpoints"])  # in the bucket
    trials = (sweep_dir / "runs").iterdir()
    assert len(trials) == 2
    for run_dir in trials:
        steps = [r["step"] for r in _records((run_dir / "metrics.jsonl").read_text())]
        assert steps == list(range(len(steps))) and steps
        assert json.loads((run_dir / "summary.json").read_text())["run_dir"] == str(run_dir)
        assert latest_checkpoint(run_dir / "checkpoints") is not None


# ---- where a submitted Ray job's results go (jobs/train.py) -------------------------
RAY_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint


def test_relative_storage_paths_under_a_ray_job_are_refused(tmp_path, monkeypatch, capsys):
    from jobs.train import main

    (tmp_path / "c.yaml").write_text("train: {steps: 1}\npretrain: {enabled: true}\n")
    monkeypatch.setenv(RAY_JOB, "{}")
    monkeypatch.delenv("FQA_STORAGE_ROOT", raising=False)
    assert main(["--config", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    for shown in ("run.out_dir='runs'", "data.dir='data/digits'", "pretrain.cache_dir='runs/cache'"):
        assert shown in err
    assert "FQA_STORAGE_ROOT" in err and "s3://" in err


@pytest.mark.parametrize("root", ["ABS", "s3://bucket/fqa"])
def test_under_a_ray_job_relative_paths_resolve_under_fqa_storage_root(
    tmp_path, monkeypatch, caplog, root
):
    from fqa.config import ConfigError, parse_config
    from jobs.train import resolve_job_paths

    root = str(tmp_path / "persist") if root == "ABS" else root
    config = parse_config({"data": {"dir": "/abs/data"}, "pretrain": {"enabled": True}})
    assert resolve_job_paths(config) == config  # not a Ray job: unchanged
    monkeypatch.setenv(RAY_JOB, "{}")
    monkeypatch.setenv("FQA_STORAGE_ROOT", root)
    with caplog.at_level(logging.INFO, logger="jobs.train"):
        resolved = resolve_job_paths(config)
    assert resolved.run.out_dir == f"{root}/runs"
    assert resolved.pretrain.cache_dir == f"{root}/runs/cache"
    assert resolved.data.dir == "/abs/data"  # absolute already: kept
    assert "run.out_dir='runs' resolved to" in caplog.text
    monkeypatch.setenv("FQA_STORAGE_ROOT", "relative/root")
    with pytest.raises(ConfigError, match="FQA_STORAGE_ROOT='relative/root' is relative"):
        resolve_job_paths(config)
    monkeypatch.setenv("FQA_STORAGE_ROOT", root)
    unused = parse_config({"data": {"dir": "/abs/data"}, "run": {"out_dir": "/abs/runs"}})
    assert resolve_job_paths(unused) == unused  # no pretraining: its cache_dir is not used


def test_missing_dependencies_give_one_line_not_a_second_traceback(
    tiny_config, tmp_path, monkeypatch, capsys
):
    """The cluster's Python cannot import the Ray layer: one line naming the fix."""
    import sys

    from jobs.train import main

    (tmp_path / "c.yaml").write_text(tiny_config().model_dump_json())
    monkeypatch.setitem(sys.modules, "cluster.driver", None)  # its import now fails
    assert main(["--config", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "lacks the project's dependencies" in err


def test_a_finished_run_asked_for_fewer_steps_says_so(tiny_config, caplog):
    Trainer(tiny_config()).fit()
    shorter = Trainer(tiny_config(train={"steps": 3}))
    with caplog.at_level(logging.WARNING, logger="fqa.trainer"):
        summary = shorter.fit()
    assert summary["steps"] == 6 and "train.steps=3" in summary["note"]
    assert "already finished 6 steps, more than train.steps=3" in caplog.text


def test_resume_or_fresh_start_is_logged(tiny_config, caplog):
    with caplog.at_level(logging.INFO, logger="fqa.trainer"):
        trainer = Trainer(tiny_config(train={"steps": 3}))
    assert "starts fresh" in caplog.text and str(trainer.run_dir) in caplog.text
    trainer.fit()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fqa.trainer"):
        Trainer(tiny_config())
    assert f"resumed {trainer.run_dir}/checkpoints/step-000003 at step 3" in caplog.text


def test_fqa_train_with_a_comparison_writes_its_outputs_to_s3(tiny_config, s3):
    from jobs.experiment import run_experiment

    config = _s3_config(tiny_config, s3, train={"steps": 3}, compare={"allocators": ["neyman"]})
    result = run_experiment(config)
    out = location(result["dir"])
    assert str(out) == f"{s3['prefix']}/runs/t"
    for name in ("comparison.json", "comparison.txt", "comparison.png"):
        assert (out / name).is_file(), name
    assert len(json.loads((out / "comparison.json").read_text())) == 2
    assert (location(f"{s3['prefix']}/runs/t-neyman") / "summary.json").is_file()
