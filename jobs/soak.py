"""``python -m jobs.soak [--steps 2000] [--quick]``: a long run of the distributed trainer
that watches for leaks.

Two QueryWorkers train a tiny ViT on digits (``lr`` estimator, so each step's reduced
gradient goes through the driver's update log, the object store and every worker).
Every ``--sample-every`` steps it records the resident memory (RSS) of the driver, each
worker and the AllocatorActor, and the bytes in Ray's object store. It prints the
samples and, per process, the growth between the first and the last 10% of the steps
(mean RSS of the last samples over the first, minus 1); the target is < 5%. The
samples and the summary go to ``--out``/soak.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import ray

from cluster.driver import ClusterTrainer
from fqa.config import Config, parse_config
from fqa.tasks.models import TINY_VIT


def soak_config(steps: int, out: Path, data_dir: str) -> Config:
    return parse_config(
        {
            "run": {"name": "soak", "out_dir": str(out), "seed": 0, "resume": False},
            "data": {"dataset": "digits", "dir": data_dir},
            "model": {"kwargs": TINY_VIT},
            "trainable": {"mode": "last_blocks", "blocks": 1},
            "estimator": {"name": "lr", "shard_rows": 16},
            "allocator": {"name": "gaussian"},
            "train": {
                "steps": steps,
                "batch_size": 16,
                "queries_per_datapoint": 4,
                "lr": 1e-3,
                "eval_every": steps,  # evaluation at the end only: the loop is under test
                "checkpoint_every": 100,  # the update log fills and empties 20 times
                "progress": False,
            },
            "cluster": {"num_workers": 2, "checksum_every": 10},
        }
    )


def rss(pid: int) -> dict[str, int]:
    """Resident set size in bytes, from /proc (Linux; psutil is not a dependency): the
    total, and its private (anonymous) part — the rest is shared memory such as the
    pages of Ray's object store this process has touched, and mapped files."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) * 1024
    return {"": fields["VmRSS"], "_anon": fields["RssAnon"]}


def _pid(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()))


def _object_store_bytes() -> int:
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)  # ours, not others
    return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)


class MemorySampler:
    """A trainer callback: every ``sample_every`` steps, the RSS of the driver, the
    AllocatorActor and each QueryWorker, and the object store's bytes."""

    def __init__(self, trainer, sample_every: int) -> None:
        self.sample_every = sample_every
        self.pids = {"driver": os.getpid(), "allocator": _pid(trainer.planner.actor)}
        self.pids.update({f"worker{i}": _pid(w) for i, w in enumerate(trainer.executor.workers)})
        self.samples: list[dict[str, int]] = []

    def on_step(self, trainer, metrics: dict[str, Any]) -> None:
        if trainer.global_step % self.sample_every == 0:
            sample = {"step": trainer.global_step, "object_store": _object_store_bytes()}
            for name, pid in self.pids.items():
                for suffix, value in rss(pid).items():
                    sample[name + suffix] = value
            self.samples.append(sample)


def growth(samples: list[dict[str, int]], steps: int) -> dict[str, dict[str, float]]:
    """Per series: mean over the first and the last 10% of the steps, and their ratio - 1."""
    first = [s for s in samples if s["step"] <= 0.1 * steps]
    last = [s for s in samples if s["step"] > 0.9 * steps]
    report = {}
    for key in samples[0]:
        if key == "step":
            continue
        a = sum(s[key] for s in first) / len(first)
        b = sum(s[key] for s in last) / len(last)
        report[key] = {"first": a, "last": b, "growth": (b / a - 1) if a else float(b > 0)}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps (>= 20)")
    parser.add_argument("--sample-every", type=int, default=20, help="steps between samples")
    parser.add_argument("--quick", action="store_true", help="60 steps, a sample every 3")
    parser.add_argument("--out", default="runs/soak", help="run directory and soak.json")
    parser.add_argument("--data", default="data/digits", help="digits dir (prepared on demand)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.sample_every = 60, 3
    if args.steps < 20 or not 1 <= args.sample_every <= args.steps // 20:
        parser.error(
            f"--steps {args.steps} with --sample-every {args.sample_every}: need steps >= 20 "
            "and at least two samples in each 10% of the steps (sample-every <= steps / 20)"
        )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    shutil.rmtree(out / "soak", ignore_errors=True)  # a fresh run, never a resumed one
    trainer = ClusterTrainer(soak_config(args.steps, out, args.data))
    sampler = MemorySampler(trainer, args.sample_every)
    trainer.callbacks.append(sampler)
    summary = trainer.fit()
    samples = sampler.samples
    report = growth(samples, args.steps)
    mib = 1024**2
    names = [k for k in samples[0] if k != "step"]
    print("step  " + "  ".join(f"{n:>12}" for n in names) + "   (MiB)")
    for sample in samples[:: max(1, len(samples) // 20)] + samples[-1:]:
        print(f"{sample['step']:>5} " + "  ".join(f"{sample[n] / mib:12.2f}" for n in names))
    print(f"growth between the first and the last 10% of {args.steps} steps:")
    for name, row in report.items():
        first, last = row["first"] / mib, row["last"] / mib
        print(f"  {name:<12} {first:9.2f} MiB -> {last:9.2f} MiB  {row['growth']:+.2%}")
    rss = [row["growth"] for name, row in report.items() if name != "object_store"]
    store = report["object_store"]
    ok = max(rss) < 0.05 and store["last"] <= max(store["first"] * 1.05, store["first"] + mib)
    result = {"steps": args.steps, "summary": summary, "growth": report, "samples": samples}
    result["within_5_percent"] = ok
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    print(f"max RSS growth {max(rss):+.2%}; target < 5%: {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
