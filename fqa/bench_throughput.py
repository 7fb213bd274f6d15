"""``python -m jobs.bench throughput``: what a query costs against plain inference.

For the same model and sub-batch of rows:

* **speed** — queries/s of each estimator's ``evaluate`` on one shard (a ``spsa``
  shard is 2 queries per row: θ±εu; an antithetic ``lr`` shard 2 per row: ±ε) against
  rows/s of a plain ``torch.inference_mode()`` forward of the model on the same rows,
  the physical floor of a query. Methods are timed in interleaved repetitions and the
  ratio is the median of the per-repetition ratios, so machine load cancels out.
* **peak memory** — the highest amount of tensor storage alive at once *above what
  existed before* (parameters, data), from the PyTorch profiler's memory timeline
  (``profile_memory``: every CPU allocation and free of a tensor storage, exact to the
  byte, independent of the process RSS and of other processes). Measured for the plain
  forward, each estimator's queries (``evaluate``) and its whole step (``evaluate`` +
  ``write_grad``, which allocates the ``.grad`` buffers), and a backpropagation step
  (forward + backward into fresh ``.grad``) of the same trainable parameters.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fqa.config import load_config
from fqa.plots import plt
from fqa.setup import build_estimator, build_task
from fqa.tasks.models import TINY_VIT

METHODS = ("forward", "spsa", "lr")


def peak_bytes(fn) -> int:
    """Peak tensor storage allocated by ``fn()`` on the CPU, above what existed before it."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def _setup(config_path: str, estimator: str, trainable: str, rows: int, overrides: dict):
    config = load_config(
        config_path,
        {
            "estimator.name": estimator,
            "trainable.mode": trainable,
            "model.checkpoint": None,  # weights do not change a query's cost
            "pretrain.enabled": False,
            "estimator.shard_rows": rows,
            "train.progress": False,
            **overrides,
        },
    )
    task = build_task(config)
    est = build_estimator(config, task)  # lr: freezes what it cannot estimate
    ids = task.train_ids()[:rows]
    shard = est.plan(ids, np.ones(rows, dtype=int), task.prepass(ids)["loss"], 0, rows)[0]
    return config, task, est, shard


def _clear_grads(task) -> None:
    for _, p in task.trainable_parameters():
        p.grad = None


def _backprop_step(task, ids) -> None:
    with torch.enable_grad():
        task.backprop_loss(ids).backward()


def measure(config_path: str, trainable: str, rows: int, reps: int, overrides: dict) -> dict:
    """Speed ratios and peak memories of every method at one sub-batch size."""
    tasks = {name: _setup(config_path, name, trainable, rows, overrides) for name in ("spsa", "lr")}
    _, task, _, shard = tasks["spsa"]
    x, _ = task._rows(np.asarray(shard.ids))

    def forward():
        with torch.inference_mode():
            task.model(x)

    def query(name):
        _, t, est, s = tasks[name]
        return lambda: est.evaluate(t, s).queries

    calls = {"forward": lambda: (forward(), rows)[1], "spsa": query("spsa"), "lr": query("lr")}
    for fn in calls.values():
        fn()  # warm-up
    per_rep: dict[str, list[float]] = {m: [] for m in METHODS}  # queries (rows) per second
    for _ in range(reps):
        for name in METHODS:  # interleaved: every method sees the same load
            started = time.perf_counter()
            count = calls[name]()
            per_rep[name].append(count / (time.perf_counter() - started))
    ratio = {
        name: statistics.median(
            q / f for q, f in zip(per_rep[name], per_rep["forward"], strict=True)
        )
        for name in ("spsa", "lr")
    }

    memory: dict[str, int] = {"forward": peak_bytes(forward)}
    for name in ("spsa", "lr"):
        _, t, est, s = tasks[name]
        _clear_grads(t)
        memory[f"{name}_queries"] = peak_bytes(lambda t=t, est=est, s=s: est.evaluate(t, s))
        _clear_grads(t)
        memory[f"{name}_step"] = peak_bytes(lambda t=t, est=est, s=s: est.estimate(t, [s]))
        _clear_grads(t)
        memory[f"{name}_backprop_step"] = peak_bytes(
            lambda t=t, s=s: _backprop_step(t, np.asarray(s.ids))
        )
        _clear_grads(t)
        memory[f"{name}_trainable_parameters"] = sum(p.numel() for _, p in t.trainable_parameters())
    return {
        "trainable": trainable,
        "rows": rows,
        "reps": reps,
        "per_second_median": {m: statistics.median(v) for m, v in per_rep.items()},
        "fraction_of_forward": ratio,
        "peak_bytes": memory,
        "spsa_queries_vs_forward_memory": memory["spsa_queries"] / memory["forward"],
        "lr_step_vs_backprop_memory": memory["lr_step"] / memory["lr_backprop_step"],
    }


def run_throughput_bench(args) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    quick = args.quick
    sizes = [16, 64] if quick else [int(s) for s in args.rows.split(",")]
    modes = ["full"] if quick else args.trainable.split(",")
    overrides = {}
    if quick:  # the test suite's tiny ViT
        overrides["model.kwargs"] = TINY_VIT
    cells = [(m, r) for m in modes for r in sizes]
    results = [
        measure(args.config, mode, rows, 3 if quick else args.reps, overrides)
        for mode, rows in tqdm(cells, desc="throughput", disable=quick)
    ]
    report = {"threads": args.threads, "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(report, indent=1))
    _plot(report, out / "throughput.png")
    print(format_report(report))
    return report


def format_report(report: dict) -> str:
    lines = [
        f"{'trainable':<11} {'rows':>5} {'forward rows/s':>14} {'spsa q/s':>9} {'spsa/fwd':>8} "
        f"{'lr q/s':>8} {'lr/fwd':>6} | peak MB: {'forward':>7} {'spsa q':>7} {'spsa step':>9} "
        f"{'lr q':>6} {'lr step':>7} {'backprop':>8}"
    ]
    mb = 1e-6
    for r in report["results"]:
        m, s, f = r["peak_bytes"], r["per_second_median"], r["fraction_of_forward"]
        lines.append(
            f"{r['trainable']:<11} {r['rows']:>5} {s['forward']:>14.0f} {s['spsa']:>9.0f} "
            f"{f['spsa']:>8.2f} {s['lr']:>8.0f} {f['lr']:>6.2f} | {'':>8} {m['forward'] * mb:>7.2f} "
            f"{m['spsa_queries'] * mb:>7.2f} {m['spsa_step'] * mb:>9.2f} {m['lr_queries'] * mb:>6.2f} "
            f"{m['lr_step'] * mb:>7.2f} {m['lr_backprop_step'] * mb:>8.2f}"
        )
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    results = report["results"]
    modes = list(dict.fromkeys(r["trainable"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode in modes:
        rows = [r for r in results if r["trainable"] == mode]
        sizes = [r["rows"] for r in rows]
        for name, style in (("spsa", "o-"), ("lr", "s--")):
            axes[0].plot(
                sizes,
                [r["fraction_of_forward"][name] for r in rows],
                style,
                label=f"{name} ({mode})",
            )
        for key, style in (
            ("forward", "k:"),
            ("spsa_queries", "o-"),
            ("lr_step", "s--"),
            ("lr_backprop_step", "^-."),
        ):
            axes[1].plot(
                sizes, [r["peak_bytes"][key] / 1e6 for r in rows], style, label=f"{key} ({mode})"
            )
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set(xscale="log", xlabel="rows per shard", ylabel="queries/s ÷ inference rows/s")
    axes[1].set(xscale="log", yscale="log", xlabel="rows per shard", ylabel="peak tensor MB")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="jobs/configs/vit_digits.yaml")
    parser.add_argument("--trainable", default="full,last_blocks", help="comma separated modes")
    parser.add_argument("--rows", default="16,64,256", help="rows per shard, comma separated")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--quick", action="store_true", help="tiny settings for tests")
