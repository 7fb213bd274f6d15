"""The bad-input sweep: every mistake gives a clear error (naming the field or file and
the fix) before any work starts, or a documented, tested recovery — never a traceback
from deep inside torch or Ray, and never modified parameters.

Config fields are swept exhaustively: every field of every section with a wrong-typed
value, and every range-limited field with a value just outside its range.
"""

from __future__ import annotations

import json
import shutil
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from annotated_types import Ge, Gt, Le, Lt
from safetensors.torch import save_file

from fqa.checkpoint import latest_checkpoint
from fqa.config import Config, ConfigError, load_config, parse_config, parse_overrides
from fqa.data import DataError, load_image_dataset, write_image_parquet
from fqa.tasks.models import CheckpointError
from fqa.trainer import Trainer, TrainingError


def _fields() -> list[tuple[str, str, typing.Any]]:
    """(section, field, FieldInfo) for every config field."""
    return [
        (section, name, info)
        for section, section_info in Config.model_fields.items()
        for name, info in section_info.annotation.model_fields.items()
    ]


def _wrong_type(info) -> bool:
    return info.annotation is not typing.Any


def _out_of_range(info):
    """A value just outside the field's declared range, or None if it has no range."""
    for bound in info.metadata:
        if isinstance(bound, Ge):
            return bound.ge - 1
        if isinstance(bound, Gt):
            return bound.gt
        if isinstance(bound, Le):
            return bound.le + 1
        if isinstance(bound, Lt):
            return bound.lt
    return None


WRONG_TYPE = [(s, f) for s, f, info in _fields() if _wrong_type(info)]
OUT_OF_RANGE = [(s, f, v) for s, f, info in _fields() if (v := _out_of_range(info)) is not None]


def _refused(data: dict, *named: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    message = str(caught.value)
    for name in named:
        assert name in message, message
    assert "Traceback" not in message
    return message


@pytest.mark.parametrize(("section", "field"), WRONG_TYPE, ids=[f"{s}.{f}" for s, f in WRONG_TYPE])
def test_every_field_with_a_wrong_type_is_refused_by_name(section, field):
    # a list of lists is the wrong type for every field (no field is a nested list)
    _refused({section: {field: [[1]]}}, f"{section}.{field}", "(got [")


@pytest.mark.parametrize(
    ("section", "field", "value"), OUT_OF_RANGE, ids=[f"{s}.{f}={v}" for s, f, v in OUT_OF_RANGE]
)
def test_every_field_out_of_range_is_refused_with_the_allowed_range(section, field, value):
    message = _refused({section: {field: value}}, f"{section}.{field}", f"got {value!r}")
    assert "greater than" in message or "less than" in message  # the allowed range


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"train": {"lrr": 0.1}}, ["train.lrr", "unknown key"]),
        ({"trian": {"lr": 0.1}}, ["trian", "unknown key"]),
        ({"estimator": {"name": "adam"}}, ["estimator", "'adam'", "spsa"]),
        ({"allocator": {"name": "magic"}}, ["allocator", "'magic'", "gaussian"]),
        ({"compare": {"allocators": ["nope"]}}, ["compare", "'nope'"]),
        ({"train": {"optimizer": "lbfgs"}}, ["train.optimizer", "'sgd'"]),
        (
            {"estimator": {"name": "spsa"}, "train": {"queries_per_datapoint": 3}},
            ["queries_per_datapoint=3", "use 4"],
        ),
        ({"allocator": {"n_min": 5}, "train": {"queries_per_datapoint": 4}}, ["n_min=5"]),
    ],
    ids=[
        "unknown-key",
        "unknown-section",
        "estimator",
        "allocator",
        "compared",
        "choice",
        "odd-budget",
        "n_min-over-budget",
    ],  # fmt: skip
)
def test_inconsistent_or_unknown_settings_are_refused(data, named):
    _refused(data, *named)


# ---- config files and overrides --------------------------------------------------------


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml does not exist; see jobs/configs/"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("train: [unclosed", "is not valid YAML"),
        ("- just\n- a list\n", "must hold a mapping, got list"),
        # safe_load never constructs Python objects: a config cannot run code
        ("train: !!python/object/apply:os.system ['touch PWNED']\n", "is not valid YAML"),
    ],
    ids=["broken-yaml", "not-a-mapping", "python-tag"],
)
def test_a_bad_config_file_is_refused_naming_the_file(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def test_an_override_without_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"--set expects KEY=VALUE .* got 'train.lr'"):
        parse_overrides(["train.lr"])


# ---- data files ------------------------------------------------------------------------


def _dataset(tmp_path: Path, labels=None, n: int = 12, name: str = "train.parquet") -> Path:
    images = np.random.default_rng(0).random((n, 1, 4, 4), dtype=np.float32)
    labels = np.arange(n) % 3 if labels is None else labels
    return write_image_parquet(tmp_path / name, np.arange(n), images, labels)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "Parquet"),
        (lambda p: p.write_bytes(b"\x00garbage" * 64), "Parquet"),
        (lambda p: p.write_bytes(b""), "Parquet"),
    ],
    ids=["truncated", "corrupt", "zero-bytes"],
)
def test_a_damaged_parquet_file_is_named(tmp_path, damage, problem):
    path = _dataset(tmp_path)
    damage(path)
    with pytest.raises(DataError, match=problem) as caught:
        load_image_dataset(path)
    assert str(path) in str(caught.value) and "Fix:" in str(caught.value)


def test_an_empty_dataset_is_named(tmp_path):
    path = write_image_parquet(
        tmp_path / "train.parquet", np.zeros(0), np.zeros((0, 1, 4, 4)), np.zeros(0)
    )
    with pytest.raises(DataError, match=r"train\.parquet: dataset is empty \(0 rows\)"):
        load_image_dataset(path)


def test_negative_labels_are_named(tmp_path):
    path = _dataset(tmp_path, labels=np.full(12, -1))
    with pytest.raises(DataError, match="label") as caught:
        load_image_dataset(path)
    assert str(path) in str(caught.value)


def _parquet_config(tiny_config, digits_dir: Path, tmp_path: Path, **sections):
    """The digits splits copied to a directory the test can damage."""
    data_dir = tmp_path / "data"
    shutil.copytree(digits_dir, data_dir)
    return data_dir, lambda: tiny_config(
        data={"dataset": "parquet", "dir": str(data_dir)}, **sections
    )


def test_labels_beyond_the_declared_classes_are_refused(tiny_config, digits_dir, tmp_path):
    data_dir, make = _parquet_config(tiny_config, digits_dir, tmp_path)
    (data_dir / "dataset.json").write_text(json.dumps({"num_classes": 3}))
    with pytest.raises(DataError, match=r"train.parquet: label 9 is >= num_classes=3 from "):
        Trainer(make())


@pytest.mark.parametrize("classes", [[0, 42], [-1], []], ids=["too-large", "negative", "none"])
def test_data_classes_outside_the_labels_are_refused(tiny_config, classes):
    with pytest.raises(DataError, match=r"\(data.classes\) but its labels are 0..9. Fix: "):
        Trainer(tiny_config(data={"classes": classes}))


def test_an_unknown_model_name_is_refused_with_examples(tiny_config):
    with pytest.raises(ValueError, match="unknown timm model 'vit_nonexistent'; examples"):
        Trainer(tiny_config(model={"name": "vit_nonexistent"}))


def test_model_kwargs_the_model_does_not_take_are_named(tiny_config):
    kwargs = {**tiny_config().model.kwargs, "bogus": 1}
    with pytest.raises(ValueError, match="model.kwargs .* unexpected keyword argument 'bogus'"):
        Trainer(tiny_config(model={"kwargs": kwargs}))


def test_a_batch_larger_than_the_dataset_is_refused(tiny_config):
    with pytest.raises(ValueError, match=r"train.batch_size=100000 is larger than the training"):
        Trainer(tiny_config(train={"batch_size": 100000}))


def test_a_missing_data_directory_is_named(tiny_config, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="missing split files") as caught:
        Trainer(tiny_config(data={"dataset": "parquet", "dir": str(missing)}))
    assert str(missing) in str(caught.value)


# ---- checkpoints -----------------------------------------------------------------------


def test_model_weights_from_another_model_are_refused(tiny_config, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(other))
    with pytest.raises(CheckpointError, match="saved from another model") as caught:
        Trainer(tiny_config(model={"checkpoint": str(other)}))
    assert str(other) in str(caught.value) and "model.kwargs" in str(caught.value)


def test_a_pickle_is_never_loaded_as_weights(tiny_config, tmp_path):
    pickled = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(3)}, pickled)
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as caught:
        Trainer(tiny_config(model={"checkpoint": str(pickled)}))
    assert str(pickled) in str(caught.value)


def test_resuming_a_checkpoint_of_another_model_names_the_fields(tiny_config):
    Trainer(tiny_config(train={"steps": 3})).fit()
    other = {**tiny_config().model.kwargs, "depth": 1}
    with pytest.raises(CheckpointError, match=r"differing fields: model.kwargs .*run.name"):
        Trainer(tiny_config(model={"kwargs": other}))


def _written_checkpoint(tiny_config) -> Path:
    trainer = Trainer(tiny_config(train={"steps": 3}))
    trainer.fit()
    return latest_checkpoint(trainer.run_dir / "checkpoints")


@pytest.mark.parametrize(
    ("file", "damage"),
    [
        ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100])),
        ("state.json", lambda p: p.write_text(p.read_text()[:-20])),
        ("stats.parquet", lambda p: p.write_bytes(b"\x00" * 10)),
        ("manifest.json", lambda p: p.unlink()),
    ],
    ids=["model-truncated", "state-truncated", "stats-corrupt", "no-manifest"],
)
def test_a_damaged_checkpoint_is_refused_naming_it(tiny_config, file, damage):
    path = _written_checkpoint(tiny_config)
    damage(path / file)
    with pytest.raises(CheckpointError) as caught:
        Trainer(tiny_config()).restore(path)
    message = str(caught.value)
    assert str(path) in message and ("delete" in message or "re-create" in message), message


def test_a_checkpoint_torn_mid_write_is_skipped_for_the_last_complete_one(tiny_config):
    """A crash between writing a checkpoint and moving the ``latest`` pointer, or one that
    leaves a half-written directory: resume uses the newest complete checkpoint."""
    path = _written_checkpoint(tiny_config)
    directory = path.parent
    torn = directory / "step-000009"
    shutil.copytree(path, torn)
    (torn / "manifest.json").unlink()  # the write never finished
    (directory / "latest").write_text(torn.name)
    resumed = Trainer(tiny_config())
    assert resumed.global_step == 3


# ---- non-finite losses: the documented recovery ------------------------------------------


def test_infinite_losses_skip_steps_then_stop_with_unchanged_parameters(tiny_config):
    trainer = Trainer(tiny_config(train={"max_nonfinite_steps": 2}))
    before = [p.detach().clone() for p in trainer.params]
    original = trainer.task.prepass

    def overflowing(ids):
        out = original(ids)
        out["loss"] = np.full_like(out["loss"], np.inf)  # e.g. a model whose logits overflow
        return out

    trainer.task.prepass = overflowing
    with pytest.raises(TrainingError, match="non-finite losses .* saved in") as caught:
        trainer.fit()
    assert "train.lr" in str(caught.value)
    for old, new in zip(before, trainer.params, strict=True):
        assert torch.equal(old, new)
    assert latest_checkpoint(trainer.run_dir / "checkpoints") is not None


def test_the_job_entrypoint_reports_bad_data_in_one_line(tiny_config, tmp_path, capsys):
    """`ray job submit ... python -m jobs.train`: bad input fails before Ray starts, with
    the file named on one line and no traceback."""
    from jobs.train import main

    config = tiny_config(data={"dataset": "parquet", "dir": str(tmp_path / "nowhere")})
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
    assert main(["--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().startswith("error: DataError:") and "nowhere" in err
