"""The `fqa` command line, end to end (tiny models, few steps)."""

import json

import pytest
import yaml

from jobs.cli import main
from tests.conftest import TINY_VIT


def _write_config(path, digits_dir, out_dir, **extra):
    config = {
        "run": {"name": "cli", "out_dir": str(out_dir)},
        "data": {"dataset": "digits", "dir": str(digits_dir)},
        "model": {"kwargs": TINY_VIT},
        "trainable": {"mode": "head"},
        "allocator": {"name": "gaussian"},
        "train": {
            "steps": 4,
            "batch_size": 16,
            "queries_per_datapoint": 4,
            "eval_every": 2,
            "progress": False,
        },
        "pretrain": {"enabled": True, "epochs": 1, "cache_dir": str(out_dir / "cache")},
        "compare": {"backprop": True, "allocators": ["uniform"]},
        **extra,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_data_prepare_writes_parquet_splits(tmp_path, capsys):
    assert main(["data", "prepare", "digits", "--out", str(tmp_path / "d")]) == 0
    written = json.loads(capsys.readouterr().out)
    assert set(written) >= {"train", "validation", "test"}
    assert all(
        (tmp_path / "d" / f"{split}.parquet").is_file() for split in ("train", "validation", "test")
    )


def test_train_runs_the_main_job_with_its_comparisons(tmp_path, digits_dir, capsys):
    config = _write_config(tmp_path / "c.yaml", digits_dir, tmp_path / "runs")
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["runs"] == ["cli", "cli-uniform", "cli-backprop"]
    rows = json.loads((tmp_path / "runs" / "cli" / "comparison.json").read_text())
    assert [r["run"] for r in rows] == summary["runs"]
    assert "test_accuracy" not in out.strip().splitlines()[-1]  # the table is not repeated
    assert list((tmp_path / "runs" / "cache").glob("pretrain-*.safetensors"))
    assert (tmp_path / "runs" / "cli" / "comparison.png").is_file()
    assert "backprop" in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("estimator.name=mezo", "unknown estimator 'mezo'"),
        ("train.queries_per_datapoint=1", "not a multiple of 2"),
        ("model.name=not_a_model", "unknown timm model"),
        ("data.dataset=parquet", "missing split files"),
    ],
)
def test_train_refuses_bad_input_with_one_clear_error(
    tmp_path, digits_dir, capsys, override, message
):
    config = _write_config(tmp_path / "c.yaml", digits_dir, tmp_path / "runs")
    if override.startswith("data.dataset"):
        override_args = ["--set", override, "--set", f"data.dir={tmp_path / 'nowhere'}"]
    else:
        override_args = ["--set", override]
    assert main(["train", str(config), *override_args, "--no-compare"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["variance", "accuracy", "throughput"])
def test_fqa_bench_offers_each_benchmark(name, capsys):
    """`fqa bench <name>` is wired to the same benchmark modules that jobs.bench runs
    (their --quick runs are tested in tests/test_bench.py)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", name, "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
