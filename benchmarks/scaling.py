"""``python -m jobs.bench scaling``: how the cluster layer scales, in one run.

1. Speedup: the same spsa job (same config, seed, steps) on 2 QueryWorkers with one
   thread each against 1 worker with one thread; mean step time after a warm-up step.
2. Worker efficiency: inside one worker, spsa queries/s (``QueryWorker.evaluate`` on a
   real shard) against a plain ``torch.inference_mode()`` forward of the same model and
   batch size (rows/s).
3. Projection: step time for 8-64 workers from the measured per-query cost c and the
   per-step overhead o of the 1-worker run: T(W) = o + Q·c/W (Q queries per step).
4. Driver bytes per step: shard results in plus the update out, for spsa and lr on a
   27k- and a 21M-parameter ViT (the quick mode: 27k and 203k), full fine-tuning on 2
   workers. lr's gradient sums are all-reduced among the workers instead (8 bytes per
   parameter per worker, also printed), so neither figure grows with the model.

Writes scaling.json and scaling.png. Needs Ray: it joins a running Ray instance when this
process already has one, else starts an embedded one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from benchmarks.common import add_common_arguments, save_figure, write_report
from cluster.runtime import connect
from cluster.worker import QueryWorker
from fqa.config import Config, load_config, with_overrides


class BenchWorker(QueryWorker):
    def throughput(self, shard, reps: int) -> dict[str, float]:
        """spsa queries/s on ``shard`` and plain forward rows/s on the same rows."""
        self.evaluate(shard, 0, 0)  # warm-up (a fresh replica holds step 0)
        started, queries = time.perf_counter(), 0
        for _ in range(reps):
            queries += self.evaluate(shard, 0, 0).queries
        spsa_s = time.perf_counter() - started
        x, _ = self.task._rows(np.array(shard.ids))
        with torch.inference_mode():
            self.task.model(x)
            started = time.perf_counter()
            for _ in range(reps):
                self.task.model(x)
            plain_s = time.perf_counter() - started
        return {
            "spsa_queries_per_s": queries / spsa_s,
            "forward_rows_per_s": reps * len(shard.ids) / plain_s,
            "seconds_per_query": spsa_s / queries,
            "rows": len(shard.ids),
        }


def bench_config(config_path: str, quick: bool, runs: Path) -> Config:
    config = load_config(config_path)
    steps = 3 if quick else 8
    return with_overrides(
        config,
        {
            "run.out_dir": str(runs),
            "run.resume": False,
            "estimator.name": "spsa",
            "estimator.shard_rows": 32 if quick else 64,
            "allocator.name": "uniform",
            "allocator.kwargs": {},
            "pretrain.enabled": False,
            "train.steps": steps,
            "train.batch_size": 32 if quick else 64,
            "train.queries_per_datapoint": 4 if quick else 8,
            "train.eval_every": steps,
            "train.checkpoint_every": steps,
            "train.progress": False,
            "compare.backprop": False,
            "compare.allocators": [],
            "cluster.cpus_per_worker": 1,
            "cluster.checksum_every": steps,
        },
    )


def timed_run(config: Config, workers: int) -> dict[str, Any]:
    from cluster.driver import ClusterTrainer

    named = with_overrides(
        config, {"cluster.num_workers": workers, "run.name": f"scaling-{workers}w"}
    )
    trainer = ClusterTrainer(named)
    trainer.fit()
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    seconds = [json.loads(line)["step_seconds"] for line in lines][1:]  # first: warm-up
    return {
        "workers": workers,
        "step_seconds": float(np.mean(seconds)),
        "queries_per_step": trainer.queries / trainer.global_step,
    }


# (embed_dim, depth, heads) of the ViTs whose driver traffic is compared
_BYTES_MODELS = {False: [(32, 2, 2), (384, 12, 6)], True: [(32, 2, 2), (64, 4, 4)]}


def driver_bytes(config: Config, quick: bool) -> list[dict[str, Any]]:
    """Mean driver bytes per step (results in + update out) per estimator and model."""
    from cluster.driver import ClusterTrainer

    rows = []
    for estimator in ("spsa", "lr"):
        for width, depth, heads in _BYTES_MODELS[quick]:
            kwargs = dict(config.model.kwargs, embed_dim=width, depth=depth, num_heads=heads)
            named = with_overrides(
                config,
                {
                    "run.name": f"bytes-{estimator}-{width}x{depth}",
                    "model.kwargs": kwargs,
                    "trainable.mode": "full",
                    "estimator.name": estimator,
                    "estimator.shard_rows": 16,
                    "train.steps": 2,
                    "train.eval_every": 2,
                    "train.checkpoint_every": 2,
                    "train.batch_size": 16,
                    "train.queries_per_datapoint": 4,
                    "cluster.num_workers": 2,
                },
            )
            trainer = ClusterTrainer(named)
            trainer.fit()
            params = trainer.executor.trainable_count()
            rows.append(
                {
                    "estimator": estimator,
                    "parameters": params,
                    "model": f"ViT width {width}, depth {depth}",
                    "driver_bytes_per_step": float(np.mean(trainer.executor.driver_bytes)),
                    # lr: each worker sends and receives the int64 sums once per step
                    "collective_bytes_per_step": 8 * params if estimator == "lr" else 0,
                }
            )
    return rows


def run(args) -> dict[str, Any]:
    result = measure(args.config, args.quick, Path(args.runs) / "scaling")
    write_report(args.out, "scaling", result, _plot)
    print(format_report(result))
    return result


def measure(config_path: str, quick: bool, runs: Path) -> dict[str, Any]:
    """The 2-vs-1 speedup, one worker's efficiency and the projection; ``runs``: scratch
    run directories."""
    config = bench_config(config_path, quick, runs)
    owns = connect(num_cpus=2)
    try:
        one, two = timed_run(config, 1), timed_run(config, 2)
        worker = ray.remote(num_cpus=1)(BenchWorker).remote(config.model_dump_json(), 1)
        from fqa.setup import BatchSampler, build_task

        task = build_task(config)  # the first batch's shard, planned as the driver would
        from fqa.estimators import create_estimator

        ids = BatchSampler(task.train_ids(), config.train.batch_size, 0).batch(0)
        shard = create_estimator("spsa", epsilon=config.estimator.epsilon).plan(
            ids,
            np.full(len(ids), 2),
            np.zeros(len(ids)),
            0,
            config.estimator.shard_rows,
        )[0]
        per_worker = ray.get(worker.throughput.remote(shard, 5 if quick else 30))
        ray.kill(worker)
        traffic = driver_bytes(config, quick)
    finally:
        if owns:
            ray.shutdown()
    per_query = per_worker["seconds_per_query"]
    queries = one["queries_per_step"]
    overhead = max(0.0, one["step_seconds"] - queries * per_query)
    result = {
        "quick": quick,
        "one_worker": one,
        "two_workers": two,
        "speedup_2v1": one["step_seconds"] / two["step_seconds"],
        "worker": per_worker,
        "worker_efficiency": per_worker["spsa_queries_per_s"] / per_worker["forward_rows_per_s"],
        "per_step_overhead_s": overhead,
        "projected_step_seconds": {
            w: overhead + queries * per_query / w for w in (1, 2, 8, 16, 32, 64)
        },
        "driver_bytes": traffic,
    }
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    from fqa.plots import plt

    projected = result["projected_step_seconds"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(list(projected), list(projected.values()), "o-", label="projected")
    ax.plot(
        [1, 2],
        [result["one_worker"]["step_seconds"], result["two_workers"]["step_seconds"]],
        "s",
        label="measured",
    )
    ax.set(xscale="log", yscale="log", xlabel="workers", ylabel="step seconds")
    ax.legend()
    save_figure(fig, path, dpi=100)


def format_report(result: dict[str, Any]) -> str:
    lines = [
        f"speedup 2 workers vs 1 (one thread each): {result['speedup_2v1']:.2f}x",
        f"per-worker spsa throughput: {result['worker']['spsa_queries_per_s']:.0f} queries/s = "
        f"{result['worker_efficiency']:.0%} of a plain inference_mode forward "
        f"({result['worker']['forward_rows_per_s']:.0f} rows/s, batch {result['worker']['rows']})",
        f"per-step overhead: {result['per_step_overhead_s'] * 1e3:.1f} ms",
    ]
    for workers, seconds in result["projected_step_seconds"].items():
        lines.append(f"projected step time, {workers:>2} workers: {seconds * 1e3:.1f} ms")
    for row in result["driver_bytes"]:
        lines.append(
            f"driver bytes/step, {row['estimator']:<4} {row['parameters']:>10,} parameters: "
            f"{row['driver_bytes_per_step']:>9,.0f}"
            + (
                f"   (all-reduced among workers: {row['collective_bytes_per_step']:,} per worker)"
                if row["collective_bytes_per_step"]
                else ""
            )
        )
    return "\n".join(lines)


def add_arguments(parser) -> None:
    add_common_arguments(parser)
