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
    summary = Trainer(remote_config).fit()
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
