"""The single-process trainer end to end on the digits Parquet data (tiny ViT, few steps)."""

import json

import numpy as np
import pytest
import torch

from fqa.checkpoint import latest_checkpoint
from fqa.config import with_overrides
from fqa.plots import draw_run
from fqa.tasks.models import CheckpointError
from fqa.trainer import Trainer, TrainingError


def _params(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.params])


@pytest.mark.parametrize(
    ("estimator", "allocator"), [("lr", "gaussian"), ("spsa", "neyman"), ("lr", "bernoulli")]
)
def test_run_writes_metrics_plot_checkpoint_and_summary(tiny_config, estimator, allocator):
    config = tiny_config(estimator={"name": estimator}, allocator={"name": allocator})
    trainer = Trainer(config)
    before = _params(trainer).clone()
    summary = trainer.fit()
    run = trainer.run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))
    # queries: pre-pass B plus B * queries_per_datapoint perturbed queries per step
    assert records[-1]["queries"] == summary["queries"] == 6 * (16 + 16 * 4)
    assert all(r["alloc_min"] >= 1 for r in records)
    assert "val_accuracy" in records[2]
    assert not (run / "curves.png").exists()  # the trainer writes metrics; a reporter draws
    assert draw_run(run).stat().st_size > 1000
    assert latest_checkpoint(run / "checkpoints").name == "step-000006"
    assert not torch.equal(before, _params(trainer))
    assert 0.0 <= summary["test_accuracy"] <= 1.0


def test_resume_continues_to_the_same_parameters(tiny_config):
    straight = Trainer(tiny_config(allocator={"name": "gaussian"}, run={"name": "straight"}))
    straight.fit()

    interrupted = tiny_config(
        allocator={"name": "gaussian"}, run={"name": "resumed"}, train={"steps": 3}
    )
    Trainer(interrupted).fit()
    resumed = Trainer(with_overrides(interrupted, {"train.steps": 6}))
    assert resumed.global_step == 3
    resumed.fit()
    torch.testing.assert_close(_params(resumed), _params(straight), rtol=0, atol=0)
    assert resumed.queries == straight.queries
    assert resumed.allocator.state_dict() == straight.allocator.state_dict()
    steps = [
        json.loads(x)["step"] for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(6))  # every step exactly once


def test_resume_refuses_a_checkpoint_of_another_config(tiny_config):
    Trainer(tiny_config(train={"steps": 3})).fit()
    with pytest.raises(CheckpointError, match=r"differing fields: estimator.sigma \(0.1 -> 0.2\)"):
        Trainer(tiny_config(estimator={"sigma": 0.2}))


def test_truncated_checkpoint_is_detected(tiny_config):
    trainer = Trainer(tiny_config(train={"steps": 3}))
    trainer.fit()
    model_file = latest_checkpoint(trainer.run_dir / "checkpoints") / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="checksum does not match"):
        Trainer(tiny_config())


def test_nonfinite_queries_never_reach_the_parameters(tiny_config):
    trainer = Trainer(tiny_config(train={"max_nonfinite_steps": 2}))
    original = trainer.task.losses

    def poisoned(ids):
        losses = original(ids).clone()
        losses[0] = float("inf")
        return losses

    trainer.task.losses = poisoned
    before = _params(trainer).clone()
    with pytest.raises(TrainingError, match="2 steps in a row had non-finite"):
        trainer.fit()
    assert torch.equal(before, _params(trainer))
    assert latest_checkpoint(trainer.run_dir / "checkpoints") is not None
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped"] for r in records) and records[0]["nonfinite"] >= 1


def test_a_single_bad_step_is_skipped_and_training_goes_on(tiny_config):
    trainer = Trainer(tiny_config())
    original, calls = trainer.task.losses, []

    def once_nan(ids):
        calls.append(1)
        losses = original(ids)
        return losses * float("nan") if len(calls) == 1 else losses

    trainer.task.losses = once_nan
    trainer.fit()
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["skipped"] and not any(r["skipped"] for r in records[1:])


def test_batch_larger_than_dataset_is_refused(tiny_config):
    with pytest.raises(ValueError, match="larger than the training set"):
        Trainer(tiny_config(train={"batch_size": 100000}))


def test_model_checkpoint_of_another_model_is_refused(tiny_config, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(CheckpointError, match="does not fit model"):
        Trainer(tiny_config(model={"checkpoint": str(path)}))
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(tiny_config(model={"checkpoint": str(tmp_path / "nope.safetensors")}))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        Trainer(tiny_config(model={"checkpoint": str(garbage)}))


def test_unknown_timm_model_is_refused(tiny_config):
    with pytest.raises(ValueError, match="unknown timm model 'vit_nonexistent'"):
        Trainer(tiny_config(model={"name": "vit_nonexistent"}))


def test_batches_are_a_pure_function_of_seed_and_step(tiny_config):
    trainer = Trainer(tiny_config())
    first = [trainer.sampler.batch(s) for s in range(200)]
    again = Trainer(tiny_config(run={"name": "other"}))
    assert all(np.array_equal(a, again.sampler.batch(s)) for s, a in enumerate(first))
    per_epoch = trainer.sampler.per_epoch
    epoch = np.concatenate(first[:per_epoch])
    assert len(set(epoch.tolist())) == len(epoch)  # no datapoint twice within an epoch
