"""The backbone_features task (the main job's): a head over a frozen backbone's block
tokens, on target classes the backbone's pretraining never saw."""

import numpy as np
import pytest
import torch

from fqa.backprop import train_backprop, with_pretrained
from fqa.setup import build_task
from fqa.trainer import Trainer

SOURCE, TARGET = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


@pytest.fixture
def features_config(tiny_config, tmp_path):
    def make(**train):
        return tiny_config(
            data={"classes": TARGET},
            task={"name": "backbone_features", "feature_block": 0},
            trainable={"mode": "head"},
            train=train,
            pretrain={
                "enabled": True,
                "classes": SOURCE,
                "epochs": 1,
                "cache_dir": str(tmp_path / "cache"),
            },
        )

    return make


def test_rows_are_target_classes_only_and_features_are_deterministic(features_config):
    from sklearn.datasets import load_digits

    digit = load_digits().target
    config = with_pretrained(features_config())
    first, second = build_task(config), build_task(config)
    for split in ("train", "validation", "test"):
        ids = first.split_ids(split)
        assert len(ids) and set(digit[ids].tolist()) <= set(TARGET)  # no source class
        assert torch.equal(first._y[split], torch.as_tensor(digit[ids] - 5))  # relabelled
        assert torch.equal(first._x[split], second._x[split])  # bit-identical features
        assert np.array_equal(ids, second.split_ids(split))
    # every target row of the dataset is used exactly once across the splits
    used = np.concatenate([first.split_ids(s) for s in ("train", "validation", "test")])
    assert sorted(used.tolist()) == np.flatnonzero(np.isin(digit, TARGET)).tolist()
    assert first._x["train"].shape[1] == 32 * 4 * 4  # block-0 patch tokens of TINY_VIT
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)  # the head is initialised from run.seed


def test_overlapping_or_missing_target_classes_are_refused(tiny_config, tmp_path):
    cache = {"cache_dir": str(tmp_path / "cache"), "epochs": 1}
    overlap = tiny_config(
        data={"classes": [4, 5, 6]},
        task={"name": "backbone_features"},
        pretrain={"classes": SOURCE, **cache},
    )
    with pytest.raises(ValueError, match=r"share \[4\]"):
        build_task(overlap)
    missing = tiny_config(task={"name": "backbone_features"}, pretrain=cache)
    with pytest.raises(ValueError, match="needs data.classes"):
        build_task(missing)


@pytest.mark.parametrize("estimator", ["lr", "spsa"])
def test_training_resumes_to_the_same_head_and_backprop_trains_it(features_config, estimator):
    from fqa.config import with_overrides

    config = with_overrides(
        with_pretrained(features_config(steps=6)), {"estimator.name": estimator}
    )
    straight = Trainer(with_overrides(config, {"run.name": "straight"}))
    straight.fit()
    interrupted = with_overrides(config, {"run.name": "resumed", "train.steps": 3})
    Trainer(interrupted).fit()
    resumed = Trainer(with_overrides(interrupted, {"train.steps": 6}))
    assert resumed.global_step == 3  # from the step-3 checkpoint
    resumed.fit()
    for a, b in zip(resumed.params, straight.params, strict=True):
        assert torch.equal(a, b)
    task = build_task(config)
    before = task.evaluate("validation")["loss"]
    result = train_backprop(task, config, 6, progress=False)
    assert result["estimator"] == "backprop" and task.evaluate("validation")["loss"] < before
