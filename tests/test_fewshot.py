"""The few-shot benchmark (benchmarks/fewshot.py): its splits, its equal budgets, and its
--quick mode end to end through ``python -m jobs.bench fewshot``, step sizes picked by
Ray Tune (a couple of trials per cell)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from benchmarks.fewshot import EVALUATIONS, cells, equal_budget, kshot_split
from jobs.bench import main
from tests.conftest import TINY_VIT


def test_kshot_split_has_k_per_class_disjoint_and_a_fixed_test_split():
    labels = np.repeat(np.arange(5), [40, 37, 50, 41, 45])
    first, second = kshot_split(labels, 16, seed=0), kshot_split(labels, 16, seed=1)
    for split in (first, second):
        assert np.bincount(labels[split["train"]]).tolist() == [16] * 5
        everything = np.concatenate(list(split.values()))
        assert len(np.unique(everything)) == len(everything) == len(labels)  # disjoint, complete
        # the test split is stratified: within one row per class of half of each class
        assert np.allclose(np.bincount(labels[split["test"]]), np.bincount(labels) / 2, atol=1)
    assert np.array_equal(first["test"], second["test"])  # the same test split for every seed
    assert not np.array_equal(first["train"], second["train"])  # k-shot sets drawn per seed
    with pytest.raises(ValueError, match="lower --k"):
        kshot_split(labels, 19, seed=0)  # class 1 keeps 18 non-test rows


def test_every_cell_spends_the_same_total_on_step_boundaries():
    chosen = cells(10, 2)
    assert [c.label for c in chosen][:6] == [
        "backprop",
        "spsa/uniform q=2 (MeZO)",
        "lr/uniform q=10",
        "lr/neyman q=10",
        "lr/gaussian q=10",
        "lr/bernoulli q=10",
    ]
    # the biased count-weighting ablation pairs only with non-uniform allocators (with
    # equal counts it is the unbiased estimator)
    counted = [c for c in chosen if c.overrides.get("estimator.weighting") == "count"]
    assert [c.allocator for c in counted] == ["neyman", "gaussian"]
    total = equal_budget(40_000, 16, chosen)
    assert total >= 40_000
    for cell in chosen:
        per_step = cell.queries_per_step(16)
        assert total % (per_step * EVALUATIONS) == 0
    assert chosen[1].queries_per_step(16) == 16 * 3  # MeZO: pre-pass + one central difference
    assert chosen[2].queries_per_step(16) == 16 * 11


@pytest.mark.slow
def test_fewshot_quick(tmp_path, digits_dir, capsys):
    config = {
        "run": {"name": "fewshot", "out_dir": str(tmp_path / "runs"), "resume": False},
        "data": {"dataset": "digits", "dir": str(digits_dir)},
        "model": {"kwargs": TINY_VIT},
        "trainable": {"mode": "head"},
        "allocator": {"stats_decay": 0.8},
        "train": {"batch_size": 16, "queries_per_datapoint": 10, "progress": False},
        "pretrain": {"enabled": True, "classes": [0, 1, 2, 3, 4]},
    }
    path = tmp_path / "fewshot.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    argv = ["fewshot", "--quick", "--config", str(path), "--out", str(out)]
    assert main(argv + ["--runs", str(tmp_path / "r")]) == 0
    report = json.loads((out / "fewshot.json").read_text())
    assert (out / "fewshot.png").stat().st_size > 0
    protocol = report["protocol"]
    assert protocol["target_classes"] == [5, 6, 7, 8, 9]

    # k-shot sets: exactly k per class, disjoint from validation and test, test fixed
    from sklearn.datasets import load_digits

    digit = load_digits().target
    tests = []
    for split in report["splits_by_seed"].values():
        pool = np.asarray(report["pool_ids"])
        train, val, test = (pool[split[s]] for s in ("train", "validation", "test"))
        assert np.bincount(digit[train], minlength=10)[5:].tolist() == [protocol["k"]] * 5
        assert not set(train) & set(test) and not set(train) & set(val) and not set(val) & set(test)
        assert set(digit[np.concatenate([train, val, test])]) == {5, 6, 7, 8, 9}
        tests.append(sorted(test))
    assert tests[0] == tests[1]

    # equal total queries across every method and seed
    assert {r["queries"] for r in report["runs"]} == {protocol["total_queries"]}
    assert {r["cell"] for r in report["runs"]} == {c["label"] for c in report["cells"]}
    grid = len(protocol["lr_grid"])
    assert len(report["runs"]) == len(report["cells"]) * protocol["seeds"] * grid

    # step sizes: one Tune grid search per cell over the quick grid, on validation only
    assert protocol["lr_grid"] == [0.001, 0.003]
    assert protocol["step_size_selection"].startswith("Ray Tune")
    selection = report["selection"]
    assert set(selection) == {c["label"] for c in report["cells"]}
    rows = {row["method"]: row for row in report["table"]}
    for label, picked in selection.items():
        # Tune saw every grid point, and each trial reported the seed-mean validation
        # accuracy of exactly the runs stored for that cell and step size
        assert set(picked["val_by_lr"]) == {"0.001", "0.003"}
        for lr, val in picked["val_by_lr"].items():
            mine = [r for r in report["runs"] if r["cell"] == label and r["lr"] == float(lr)]
            assert len(mine) == protocol["seeds"]
            assert val == pytest.approx(np.mean([r["val_accuracy"] for r in mine]))
        # the selected step size is the one with the best reported validation accuracy,
        # and the table reports that cell's runs at it
        best = max(picked["val_by_lr"].values())
        assert picked["val_by_lr"][str(picked["lr"])] == best
        assert rows[label]["lr"] == picked["lr"]
        assert rows[label]["val_mean"] == pytest.approx(best)
        # Tune's experiment directory lives under --runs
        tune_dir = tmp_path / "r" / "fewshot_tune"
        assert Path(picked["tune_dir"]).resolve().parent == tune_dir.resolve()
        assert list((tmp_path / "r" / "fewshot_tune").glob("*/experiment_state*.json"))
    out_text = capsys.readouterr().out
    assert out_text.count("tune ") == 2 * len(selection)  # a line per trial, no status table
    assert "Trial Status" not in out_text and "Configuration for experiment" not in out_text

    # backprop beats chance (0.2 for 5 classes) by a margin
    assert rows["backprop"]["test_mean"] > 0.5
    for row in rows.values():
        if "ratio" in row:
            assert row["gain_star_final"] >= 1 - 1e-9  # Jensen: mean v ≥ (mean √v)²
            assert len(row["curve_test_mean"]) == EVALUATIONS
    assert np.mean(rows["lr/uniform q=10"]["alloc_cv_curve"]) == 0  # uniform: no spread
    assert np.mean(rows["lr/neyman q=10"]["alloc_cv_curve"]) > 0  # neyman: counts differ
    # the reference needs its own queries: ratio 1 by construction
    reference = rows[rows["backprop"]["reference"]]
    assert reference["ratio"] == pytest.approx(1.0)
    # each allocator against uniform at the same step size, for the whole grid
    counted = [f"lr/{a} q=10 weighting=count" for a in ("neyman", "gaussian")]
    assert {(r["lr"], r["method"]) for r in report["shared_lr"]} == {
        (lr, label)
        for lr in (0.001, 0.003)
        for label in [f"lr/{a} q=10" for a in ("neyman", "gaussian", "bernoulli")] + counted
    }
    # count weighting against the unbiased estimator with the same allocator, paired by seed
    # at every grid step size
    assert [(r["lr"], r["method"], r["unbiased"]) for r in report["weighting"]] == [
        (lr, label, label.removesuffix(" weighting=count"))
        for label in counted
        for lr in (0.001, 0.003)
    ]
    assert "test acc" in out_text
    # the tables are a pure function of the runs: rebuilding them changes nothing
    assert main(["fewshot", "--resummarise", "--out", str(out)]) == 0
    rebuilt = json.loads((out / "fewshot.json").read_text())
    assert rebuilt["table"] == report["table"] and rebuilt["shared_lr"] == report["shared_lr"]

    # --add-cells: drop the count cells, add them back under the stored protocol; the merged
    # runs are the ones the full run made (same backbone, k-shot sets, head inits)
    stripped = dict(report)
    stripped["cells"] = [c for c in report["cells"] if c["label"] not in counted]
    stripped["runs"] = [r for r in report["runs"] if r["cell"] not in counted]
    stripped["selection"] = {k: v for k, v in selection.items() if k not in counted}
    (out / "fewshot.json").write_text(json.dumps(stripped))
    add = ["--add-cells", ",".join(counted), "--runs", str(tmp_path / "r")]
    assert main(argv + add) == 0
    merged = json.loads((out / "fewshot.json").read_text())
    key = lambda r: (r["cell"], r["seed"], r["lr"])  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert sorted(map(strip, merged["runs"]), key=key) == sorted(
        map(strip, report["runs"]), key=key
    )
    assert merged["table"] == report["table"] and merged["weighting"] == report["weighting"]
    assert {k: v["val_by_lr"] for k, v in merged["selection"].items()} == {
        k: v["val_by_lr"] for k, v in selection.items()
    }
    with pytest.raises(ValueError, match="already in"):
        main(argv + add)
