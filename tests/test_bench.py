"""The benchmarks' --quick modes, end to end through ``python -m jobs.bench``: each writes
its JSON and PNG and its numbers are structurally sane (no timing assertions)."""

import json

import numpy as np
import pytest
import yaml

from benchmarks.accuracy import EVALUATIONS, method_grid
from jobs.bench import main
from tests.conftest import TINY_VIT


def _config(tmp_path, digits_dir, **extra):
    config = {
        "run": {"name": "bench", "out_dir": str(tmp_path / "runs")},
        "data": {"dataset": "digits", "dir": str(digits_dir)},
        "model": {"kwargs": TINY_VIT},
        "trainable": {"mode": "last_blocks"},
        "train": {"batch_size": 16, "queries_per_datapoint": 4, "progress": False},
        "pretrain": {"enabled": True, "epochs": 1, "cache_dir": str(tmp_path / "cache")},
        **extra,
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _run_quick(name, tmp_path, digits_dir, out):
    config = _config(tmp_path, digits_dir)
    return main(
        [name, "--quick", "--config", config, "--out", str(out), "--runs", str(tmp_path / "r")]
    )


@pytest.mark.slow
def test_variance_quick(tmp_path, digits_dir, capsys):
    out = tmp_path / "out"
    assert _run_quick("variance", tmp_path, digits_dir, out) == 0
    report = json.loads((out / "variance.json").read_text())
    assert [r["estimator"] for r in report["results"]] == ["lr", "spsa"]
    for result in report["results"]:
        rows = result["rows"]
        assert {r["budget"] for r in rows} == {2, 4}
        assert {r["allocator"] for r in rows} == {
            "uniform",
            "bernoulli",
            "neyman",
            "gaussian",
            "gaussian_fit",
            "loss_curve",
            "ceiling_gaussian",
            "ceiling_monotone",
            "oracle",
        }
        assert [o["allocator"] for o in result["overhead"]] == [
            "uniform",
            "neyman",
            "gaussian",
            "loss_curve",
        ]
        assert all(0 < o["overhead"] < 1 for o in result["overhead"])
        assert all(r["error"] > 0 and r["error_se"] >= 0 for r in rows)
        assert result["gain_star"] >= 1 - 1e-9  # mean(v)/mean(√v)² ≥ 1 (Jensen)
        for budget in (2, 4):
            cell = {r["allocator"]: r for r in rows if r["budget"] == budget}
            assert cell["uniform"]["relative_to_uniform"] == pytest.approx(1.0)
            # the oracle minimises the variance: never worse than uniform beyond the noise
            noise = 3 * np.hypot(cell["oracle"]["error_se"], cell["uniform"]["error_se"])
            assert cell["oracle"]["error"] <= cell["uniform"]["error"] + noise
            # in E Σ v/n (no repetition noise) nothing beats the oracle's continuous
            # optimum; integer rounding leaves a little slack
            if not np.isnan(cell["oracle"]["expected_share"]):  # NaN: oracle == uniform
                assert cell["oracle"]["expected_share"] == pytest.approx(1.0)
                assert all(r["expected_share"] <= 1.05 for r in cell.values())
    assert (out / "variance.png").is_file()
    assert "allocation overhead" in capsys.readouterr().out


@pytest.mark.slow
def test_accuracy_quick(tmp_path, digits_dir, capsys):
    out = tmp_path / "out"
    assert _run_quick("accuracy", tmp_path, digits_dir, out) == 0
    report = json.loads((out / "accuracy.json").read_text())
    budget, batch = report["total_queries"], report["batch_size"]
    assert set(report["regimes"]) == {"last_block", "full"}
    assert len(report["runs"]) == 2 * report["seeds"] * len(method_grid())
    for run in report["runs"]:
        per_step = batch * (3 if run["estimator"] == "backprop" else 1 + run["q"])
        assert run["steps"] == budget // per_step  # fewer queries per datapoint buy more steps
        # every method, the reference included, is charged exactly its per-step cost at
        # each of the evenly spaced evaluations (the equal-budget comparison rests on it)
        steps = run["steps"]
        eval_at = sorted(
            {max(1, round(steps * k / EVALUATIONS)) for k in range(1, EVALUATIONS + 1)}
        )
        assert run["queries"] == [s * per_step for s in eval_at]
        assert len(run["test_accuracy"]) == len(eval_at)
    table = report["table"]
    methods = {row["method"] for row in table if row["regime"] == "full"}
    assert {
        "backprop",
        "spsa/uniform q=2",
        "lr/uniform q=1",
        "lr/uniform q=8",
        "lr/gaussian q=4",
    } <= methods
    for row in table:
        if row["method"] == row["best_uniform"]:  # the reference reaches its own final accuracy
            assert np.isfinite(row["queries_to_target"]) and row[
                "ratio_to_best_uniform"
            ] == pytest.approx(1.0)
    assert (out / "accuracy.png").is_file()
    assert "queries→target" in capsys.readouterr().out


@pytest.mark.slow
def test_throughput_quick(tmp_path, digits_dir, capsys):
    out = tmp_path / "out"
    assert (
        main(
            ["throughput", "--quick", "--config", _config(tmp_path, digits_dir), "--out", str(out)]
        )
        == 0
    )
    report = json.loads((out / "throughput.json").read_text())
    assert [r["rows"] for r in report["results"]] == [16, 64]
    for result in report["results"]:
        memory = result["peak_bytes"]
        # lr estimates only Linear weights and freezes the rest (norms, embeddings): with
        # full fine-tuning it trains strictly fewer parameters than spsa
        assert memory["lr_trainable_parameters"] < memory["spsa_trainable_parameters"]
        assert all(
            memory[k] > 0
            for k in ("forward", "spsa_queries", "lr_queries", "lr2_queries", "lr_backprop_step")
        )
        # a step holds at least its queries' memory; spsa's queries are inference plus a
        # few perturbation buffers (deterministic byte counts, not timings)
        assert (
            memory["spsa_step"] >= memory["spsa_queries"]
            and memory["lr_step"] >= memory["lr_queries"]
        )
        assert memory["spsa_queries"] <= 1.2 * memory["forward"]
        # two_pass keeps no layer input past its layer: below the single pass that keeps them
        assert memory["lr2_step"] < memory["lr_step"]
        # recompute_hidden keeps each MLP's input, not its 4x-wide hidden activation
        assert memory["lrh_step"] < memory["lr_step"]
        assert set(result["fraction_of_forward"]) == {"spsa", "lr", "lr2", "lrh", "backprop"}
    big, small = report["results"][1]["peak_bytes"], report["results"][0]["peak_bytes"]
    assert big["forward"] > small["forward"]  # activations grow with the rows
    assert (out / "throughput.png").is_file()
    assert "spsa/fwd" in capsys.readouterr().out


@pytest.mark.slow
def test_scaling_quick_through_the_dispatcher(ray_cluster, tiny_config, tmp_path, capsys):
    import ray

    path = tmp_path / "scaling.yaml"
    path.write_text(json.dumps(tiny_config().model_dump(mode="json")))  # JSON is YAML
    out = tmp_path / "out"
    assert (
        main(
            [
                "scaling",
                "--quick",
                "--config",
                str(path),
                "--out",
                str(out),
                "--runs",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    assert ray.is_initialized()  # it joined the session's instance and left it running
    result = json.loads((out / "scaling.json").read_text())
    # the same job on 1 and 2 workers spends the same queries: batch x (pre-pass + q)
    assert result["one_worker"]["queries_per_step"] == result["two_workers"]["queries_per_step"]
    assert result["one_worker"]["queries_per_step"] == 32 * (1 + 4)
    assert result["speedup_2v1"] == pytest.approx(
        result["one_worker"]["step_seconds"] / result["two_workers"]["step_seconds"]
    )
    worker = result["worker"]
    assert result["worker_efficiency"] == pytest.approx(
        worker["spsa_queries_per_s"] / worker["forward_rows_per_s"]
    )
    # the projection is T(W) = o + Q·c/W: it falls with W towards the overhead o
    projected = {int(w): t for w, t in result["projected_step_seconds"].items()}
    assert set(projected) == {1, 2, 8, 16, 32, 64}
    queries, per_query = result["one_worker"]["queries_per_step"], worker["seconds_per_query"]
    for w, seconds in projected.items():
        assert seconds == pytest.approx(result["per_step_overhead_s"] + queries * per_query / w)
    # driver traffic does not grow with the model, in either mode
    for estimator in ("spsa", "lr"):
        small, large = sorted(
            (r for r in result["driver_bytes"] if r["estimator"] == estimator),
            key=lambda r: r["parameters"],
        )
        assert large["parameters"] > 3 * small["parameters"]
        assert small["driver_bytes_per_step"] == large["driver_bytes_per_step"]
    assert (out / "scaling.png").is_file()
    printed = capsys.readouterr().out
    assert "speedup 2 workers vs 1" in printed and "driver bytes/step, lr" in printed
