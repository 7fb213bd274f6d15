"""Ray Tune sweeps: the sweep file's checks (no Ray), a small sweep on the session's real
Ray instance, and the Tune fault paths (crashed trial, killed sweep driver, resources
that never come)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cluster.sweep_config import load_sweep, parse_sweep, reported_metrics, trial_config
from fqa.config import ConfigError, load_config
from tests.conftest import TINY_VIT

REPO = Path(__file__).resolve().parents[1]


def _sweep(digits_dir, tmp_path, **changes) -> dict:
    """A tiny sweep: tiny ViT head, 1 worker per trial (2 trials at once on 2 CPUs)."""
    raw = {
        "name": "tiny",
        "storage": str(tmp_path / "sweeps"),
        "config": {
            "run": {"out_dir": str(tmp_path / "runs")},
            "data": {"dataset": "digits", "dir": str(digits_dir)},
            "model": {"kwargs": TINY_VIT},
            "trainable": {"mode": "head"},
            "estimator": {"name": "lr", "sigma": 0.1},
            "train": {"batch_size": 16, "queries_per_datapoint": 4, "progress": False},
            "cluster": {"num_workers": 1},
        },
        "space": {
            "allocator.name": {"grid": ["uniform", "gaussian"]},
            "train.queries_per_datapoint": {"grid": [2, 4]},
            "train.lr": {"loguniform": [0.001, 0.01]},
        },
        "total_queries": 480,  # 10 steps at 2 queries/datapoint, 6 at 4
        "evals_per_trial": 2,
    }
    raw.update(changes)
    return raw


def _write(raw: dict, tmp_path: Path, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


# ---- the sweep file, checked before anything runs (no Ray) ----------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"space": {}}, "space is empty"),
        ({"space": {"train.lr": {"grid": []}}}, "grid is empty"),
        ({"space": {"train.lr": {"grid": [0.1], "loguniform": [0.1, 1]}}}, "exactly one of"),
        ({"space": {"train.lr": {"loguniform": [0.0, 1.0]}}}, "0 < low < high"),
        ({"space": {"train.lr": [0.1, 0.2]}}, r"space\.train\.lr"),
        ({"space": {"train.lrr": {"grid": [0.1]}}}, r"(?s)train\.lrr.*unknown key"),
        ({"space": {"optim.lr": {"grid": [0.1]}}}, r"optim: unknown key"),
        ({"space": {"train.lr": {"grid": [-1.0]}}}, r"(?s)train\.lr=-1\.0.*greater than 0"),
        ({"space": {"allocator.name": {"choice": ["nope"]}}}, r"allocator\.name='nope'"),
        ({"space": {"train.queries_per_datapoint": {"grid": [3]}}}, "not a multiple of 2"),
        ({"metric": "val_acc"}, r"'val_acc' is never reported .* val_accuracy, val_loss"),
        ({"metric": "recall"}, r"metric 'recall' is never reported"),
        ({"scheduler": {"name": "hyperband"}}, r"scheduler\.name"),
        ({"num_sample": 2}, "num_sample: unknown sweep key"),
    ],
)
def test_bad_sweep_files_fail_before_any_trial_naming_the_problem(
    digits_dir, tmp_path, change, message
):
    with pytest.raises(ConfigError, match=message):
        load_sweep(_write(_sweep(digits_dir, tmp_path, **change), tmp_path))


def test_malformed_yaml_and_missing_base_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        parse_sweep({"base": "nowhere.yaml", "space": {"train.lr": {"grid": [0.1]}}}, tmp_path)


def test_a_combination_invalid_only_together_is_refused(digits_dir, tmp_path):
    raw = _sweep(digits_dir, tmp_path)
    raw["config"]["estimator"]["antithetic"] = False  # lr: 1 query per sample
    raw["space"] = {
        "estimator.name": {"grid": ["lr", "spsa"]},
        "train.queries_per_datapoint": {"grid": [3]},  # fine for lr, not for spsa's pairs
    }
    with pytest.raises(ConfigError, match=r"(?s)combination .*'spsa'.*not a multiple of 2"):
        parse_sweep(raw)


def test_the_metrics_a_trial_reports_come_from_the_task(digits_dir, tmp_path):
    _, base = parse_sweep(_sweep(digits_dir, tmp_path))
    assert reported_metrics(base) == (
        "loss", "accuracy", "queries", "step", "val_accuracy", "val_loss"
    )  # fmt: skip
    sweep, _ = parse_sweep(_sweep(digits_dir, tmp_path, metric="val_loss", mode="min"))
    assert sweep.metric == "val_loss"


def test_total_queries_buys_equal_cost_across_budgets(digits_dir, tmp_path):
    sweep, base = parse_sweep(_sweep(digits_dir, tmp_path, total_queries=64_000))
    costs = {}
    for q in (2, 4, 16):
        config = trial_config(base, sweep, {"train.queries_per_datapoint": q})
        per_step = config.train.batch_size * (q + 1)  # pre-pass + perturbed queries
        costs[q] = config.train.steps * per_step
        assert config.train.checkpoint_every % config.train.eval_every == 0
    assert all(abs(c - 64_000) <= 16 * 17 / 2 for c in costs.values()), costs
    # twice the queries per datapoint, about half the steps
    steps = {
        q: trial_config(base, sweep, {"train.queries_per_datapoint": q}).train.steps for q in (2, 4)
    }
    assert steps[2] / steps[4] == pytest.approx(5 / 3, rel=0.02)


# ---- on the session's Ray instance ------------------------------------------------------
ray = pytest.importorskip("ray")


@pytest.mark.ray
def test_resources_a_trial_can_never_get_are_refused_before_it_starts(
    ray_cluster, digits_dir, tmp_path
):
    from cluster.runtime import ClusterResourceError
    from cluster.tune import check_resources

    sweep, base = parse_sweep(_sweep(digits_dir, tmp_path))
    assert check_resources(sweep, base) == 2  # 1 worker x 1 CPU per trial, 2 CPUs
    raw = _sweep(digits_dir, tmp_path)
    raw["space"]["cluster.num_workers"] = {"grid": [1, 3]}
    sweep, base = parse_sweep(raw)
    with pytest.raises(ClusterResourceError, match=r"needs 3 CPU .* has 2 CPU in total"):
        check_resources(sweep, base)
    sweep, base = parse_sweep(_sweep(digits_dir, tmp_path, driver_cpus=0.5))
    assert check_resources(sweep, base) == 1  # 1.5 CPUs per trial


@pytest.mark.ray
def test_a_small_sweep_runs_ranks_and_writes_its_outputs(ray_cluster, digits_dir, tmp_path):
    from cluster.sweep_results import write_outputs
    from cluster.tune import run_sweep

    sweep, base = parse_sweep(_sweep(digits_dir, tmp_path, scheduler={"name": "none"}))
    results, sweep_dir = run_sweep(sweep, base)
    assert results.num_errors == 0 and len(results) == 4
    for result in results:  # every evaluation report carries the metrics a sweep may use
        frame = result.metrics_dataframe
        assert set(reported_metrics(base)) <= set(frame.columns)
        assert frame["queries"].is_monotonic_increasing
        assert frame["queries"].iloc[-1] == pytest.approx(480, abs=16 * 5 / 2)
        assert result.checkpoint is not None
    summary = write_outputs(results, sweep, base, sweep_dir)

    table = pd.read_parquet(sweep_dir / "results.parquet")
    assert len(table) == 4 and list(table["status"]) == ["TERMINATED"] * 4
    assert pd.read_csv(sweep_dir / "results.csv")["trial_id"].tolist() == table["trial_id"].tolist()
    assert sorted(table["steps_done"]) == [6, 6, 10, 10]  # equal queries: fewer steps at q=4
    assert set(zip(table["allocator"], table["queries_per_datapoint"], strict=True)) == {
        (a, q) for a in ("uniform", "gaussian") for q in (2, 4)
    }
    # the table's best validation accuracy (from each run's metrics.jsonl) is what the
    # trial reported to Tune, an independent record of the same evaluations
    reported = {Path(r.path).name: r.metrics_dataframe["val_accuracy"].max() for r in results}
    assert dict(zip(table["trial_id"], table["best_val_accuracy"], strict=True)) == pytest.approx(
        reported
    )
    assert table["wall_s"].notna().all()
    assert summary["best_val_accuracy"] == table["best_val_accuracy"].max()
    for name in ("curves.png", "best.png", "ranking.md"):
        assert (sweep_dir / name).stat().st_size > 0
    assert (sweep_dir / "ranking.md").read_text().count("\n| ") == 4  # one row per (alloc, q)
    best = load_config(sweep_dir / "best_config.yaml")  # ready for jobs.train
    # tiny runs often tie: the best config must be one of the trials with the top value
    top = table[table["best_val_accuracy"] == table["best_val_accuracy"].max()]
    assert (best.allocator.name, best.train.lr) in set(
        zip(top["allocator"], top["lr"], strict=True)
    )
    assert best.run.name == "tiny-best"


def test_asha_compares_trials_at_equal_queries_consumed(digits_dir, tmp_path):
    """The rungs are in queries: a trial many reports in but few queries in is not judged
    yet; at the first rung (total/8 = 60 queries) the worse of two trials is stopped."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from cluster.tune import make_scheduler

    sweep, base = parse_sweep(_sweep(digits_dir, tmp_path))
    scheduler = make_scheduler(sweep, base)
    assert isinstance(scheduler, ASHAScheduler)
    scheduler.set_search_properties("val_accuracy", "max")
    good, bad = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")
    for trial in (good, bad):
        scheduler.on_trial_add(None, trial)

    def report(trial, queries, accuracy, iteration):
        result = {"queries": queries, "val_accuracy": accuracy, "training_iteration": iteration}
        return scheduler.on_trial_result(None, trial, result)

    assert report(good, 60, 0.8, 1) == TrialScheduler.CONTINUE
    assert report(bad, 30, 0.1, 50) == TrialScheduler.CONTINUE  # 50 reports, < 1 rung of queries
    assert report(bad, 60, 0.1, 51) == TrialScheduler.STOP
    fifo, _ = parse_sweep(_sweep(digits_dir, tmp_path, scheduler={"name": "none"}))
    assert type(make_scheduler(fifo, base)).__name__ == "FIFOScheduler"


# ---- faults (issue 7) ---------------------------------------------------------------------
def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


@pytest.mark.ray
@pytest.mark.faults
def test_a_crashed_trial_is_retried_from_its_tune_checkpoint(ray_cluster, digits_dir, tmp_path):
    """The hook raises once at step 7 after deleting the trial's local checkpoints (its node
    and disk are gone): the retry can only resume from the checkpoint Tune persisted."""
    from cluster.tune import run_sweep

    raw = _sweep(digits_dir, tmp_path, crash_at_step=7, max_failures=1, scheduler={"name": "none"})
    raw["space"] = {"train.queries_per_datapoint": {"grid": [2]}}  # one trial, 10 steps
    raw["evals_per_trial"] = 5  # evaluate every 2 steps, checkpoint every 2
    sweep, base = parse_sweep(raw)
    results, sweep_dir = run_sweep(sweep, base)
    assert results.num_errors == 0
    (result,) = list(results)
    run_dir = sweep_dir / "runs" / Path(result.path).name
    assert (run_dir / "crashed").read_text() == "7"  # the crash did happen
    assert _steps(run_dir) == list(range(10))  # every step once
    # from scratch, the steps reported before the crash (1, 3, ...) would be reported again
    # (Tune may drop the last report before a failure, so step 5 can be absent)
    reported = result.metrics_dataframe["step"].tolist()
    assert reported[:2] == [1, 3] and reported[-2:] == [7, 9], reported
    assert reported == sorted(set(reported)), reported
    assert result.metrics["queries"] == 10 * 16 * 3


def _sweep_process(config: Path, env: dict, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.sweep", "--config", str(config), *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, killed as one
    )  # fmt: skip


def _join_env(ray_cluster) -> dict:
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"]["gcs_address"]}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


@pytest.mark.ray
@pytest.mark.faults
def test_a_killed_sweep_driver_is_resumed_and_every_trial_completes_once(
    ray_cluster, digits_dir, tmp_path
):
    raw = _sweep(digits_dir, tmp_path, scheduler={"name": "none"}, total_queries=1440)
    raw["space"] = {"allocator.name": {"grid": ["uniform", "gaussian"]}}  # 2 trials, 18 steps
    raw["evals_per_trial"] = 6  # checkpoint every 3 steps
    path = _write(raw, tmp_path)
    runs = tmp_path / "sweeps" / "tiny" / "runs"
    driver = _sweep_process(path, _join_env(ray_cluster))
    try:  # kill it once a trial has checkpointed, before the sweep is done
        deadline = time.monotonic() + 480  # a hang guard, not a timing assertion
        while time.monotonic() < deadline and driver.poll() is None:
            if list(runs.glob("*/checkpoints/latest")):
                break
            time.sleep(0.5)
        assert driver.poll() is None, driver.communicate()[0][-3000:]
        os.killpg(driver.pid, signal.SIGKILL)
    finally:
        driver.wait()
    assert not (tmp_path / "sweeps" / "tiny" / "results.csv").exists()  # it did not finish

    resumed = _sweep_process(path, _join_env(ray_cluster), "--resume")
    output = resumed.communicate(timeout=540)[0]
    assert resumed.returncode == 0, output[-3000:]
    # a person reading the log: the JSON summary is the very last line, and Tune's own
    # status table (whose "current best" disagrees with the ranking) is not in it
    assert output.strip(), "the resumed sweep printed nothing"
    last = output.strip().splitlines()[-1]
    assert last.startswith("{"), output[-2000:]
    summary = json.loads(last)
    assert summary["trials"] == 2 and summary["status"] == {"TERMINATED": 2}
    assert "Current best trial" not in output
    table = pd.read_csv(tmp_path / "sweeps" / "tiny" / "results.csv")
    assert sorted(table["allocator"]) == ["gaussian", "uniform"]
    assert list(table["status"]) == ["TERMINATED"] * 2
    for trial in table["trial_id"]:
        assert _steps(runs / trial) == list(range(18))  # each step exactly once
    assert len(list(runs.iterdir())) == 2  # no trial was started twice under a new id


@pytest.mark.ray
@pytest.mark.faults
def test_a_sweep_asking_for_more_than_the_cluster_has_fails_fast(ray_cluster, digits_dir, tmp_path):
    raw = _sweep(digits_dir, tmp_path)
    raw["config"]["cluster"] = {"num_workers": 2, "cpus_per_worker": 1.5}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.sweep", "--config", str(_write(raw, tmp_path))],
        cwd=REPO, env=_join_env(ray_cluster), capture_output=True, text=True,
        timeout=300,  # a hang guard: Tune would otherwise leave the trials pending forever
    )  # fmt: skip
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "ClusterResourceError: one trial needs 3 CPU" in done.stderr
    assert "has 2 CPU in total" in done.stderr
    assert not (tmp_path / "sweeps" / "tiny").exists()  # nothing started


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_runs_a_sweep(ray_cluster, digits_dir, tmp_path):
    raw = _sweep(digits_dir, tmp_path, scheduler={"name": "none"})
    raw["space"] = {"allocator.name": {"grid": ["uniform", "gaussian"]}}
    path = _write(raw, tmp_path)
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    command = [
        str(Path(sys.executable).with_name("ray")), "job", "submit",
        "--address", ray_cluster["dashboard_url"], "--working-dir", str(REPO), "--",
        sys.executable, "-m", "jobs.sweep", "--config", str(path),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith('{"dir"')][-1])
    assert summary["trials"] == 2 and summary["status"] == {"TERMINATED": 2}
    table = pd.read_csv(tmp_path / "sweeps" / "tiny" / "results.csv")
    assert sorted(table["allocator"]) == ["gaussian", "uniform"]
