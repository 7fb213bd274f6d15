"""Bad configuration is refused before any work, with the field, the value and the fix."""

from pathlib import Path

import pytest

from fqa.config import ConfigError, load_config, parse_config
from fqa.tasks import list_tasks


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"estimator": {"name": "mezo"}}, "unknown estimator 'mezo'; choose one of: lr, spsa"),
        ({"allocator": {"name": "greedy"}}, "unknown allocator 'greedy'"),
        ({"compare": {"allocators": ["nope"]}}, "unknown allocator 'nope'"),
        ({"estimator": {"sigma": 0}}, "estimator.sigma: Input should be greater than 0 (got 0)"),
        ({"estimator": {"name": "spsa", "epsilon": -1e-3}}, "estimator.epsilon"),
        ({"train": {"lr": -1}}, "train.lr"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"train": {"steps": "many"}}, "train.steps: Input should be a valid integer"),
        ({"train": {"optimizer": "lion"}}, "train.optimizer"),
        ({"train": {"lr_rate": 0.1}}, "train.lr_rate: unknown key"),
        ({"trainer": {}}, "trainer: unknown key"),
        ({"allocator": {"n_min": 0}}, "allocator.n_min"),
        ({"allocator": {"stats_decay": 1.5}}, "allocator.stats_decay"),
        ({"train": {"queries_per_datapoint": 3}}, "not a multiple of 2"),
        (
            {"train": {"queries_per_datapoint": 4}, "allocator": {"n_min": 3}},
            "below allocator.n_min=3",
        ),
        ({"trainable": {"mode": "some"}}, "trainable.mode"),
        ({"data": {"dataset": "mnist"}}, "data.dataset"),
        (
            {"task": {"name": "segmentation"}},
            "unknown task 'segmentation'; choose one of: backbone_features, clip_align, clip_prompt, image_classification",
        ),
    ],
)
def test_bad_config_names_field_and_fix(data, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert expected in str(info.value)


def test_defaults_are_valid():
    config = parse_config({})
    assert (
        config.sample_budget() == config.train.batch_size * config.train.queries_per_datapoint // 2
    )


def test_one_query_samples_without_antithetic_pairs():
    config = parse_config(
        {"estimator": {"antithetic": False}, "train": {"queries_per_datapoint": 3}}
    )
    assert config.sample_budget() == config.train.batch_size * 3


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping, got list"):
        load_config(listy)


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


def test_every_shipped_config_is_tested():
    names = {p.name for p in SHIPPED}
    assert {"vit_digits.yaml", "clip_align_digits.yaml", "clip_prompt_digits.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_parses(path):
    """Every YAML in jobs/configs, the CLIP and sweep files included, is a valid config
    (sweep files: their base, overrides and search space)."""
    if path.name.startswith("sweep_"):
        from cluster.sweep_config import load_sweep, trial_config

        sweep, base = load_sweep(str(path))
        assert sweep.space, f"{path.name}: an empty search space"
        assert base.task.name in list_tasks()
        first = {key: spec.grid[0] if spec.grid else None for key, spec in sweep.space.items()}
        if all(v is not None for v in first.values()):
            trial_config(base, sweep, first)  # a trial's config validates too
        return
    config = load_config(path, {"train.steps": 7})
    assert config.train.steps == 7
    assert config.task.name in list_tasks()
    if path.name.startswith("clip_"):
        assert config.task.name == path.name.split("_digits")[0]
