"""``python -m jobs.gpu_check --out gpu_check.json``: the checks that need a CUDA GPU.

1. the ``gpu``-marked tests (device-parametrised unbiasedness, spsa replay bit-identical
   across CPU and CUDA, a resumed run on CUDA);
2. throughput and peak memory on timm ``vit_base_patch16_224`` (random init, bf16,
   batch 64): spsa queries/s ÷ inference rows/s, spsa peak ÷ inference peak, lr
   queries/s ÷ inference, lr step peak ÷ backprop step peak (``torch.cuda.synchronize``
   around timings, ``max_memory_allocated`` after ``reset_peak_memory_stats``, both
   above the memory held before the call: weights and data);
3. a 2-worker Ray run sharing the GPU (``cluster.gpus_per_worker: 0.5``).

One JSON file out; about 3-4 minutes on one H200. Without CUDA it exits with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def run_gpu_tests(timeout: int = 150) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "tests/test_device.py",
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return {
        "returncode": proc.returncode,
        "summary": (proc.stdout.strip().splitlines() or [""])[-1],
        "tail": proc.stdout[-3000:],
        "seconds": time.perf_counter() - started,
    }


class _ImageTask:
    """Random 224px images on the GPU, a timm model with fp32 master weights, bf16 forwards."""

    def __new__(cls, model_name: str, rows: int, trainable: str = "full"):
        import timm

        from fqa.device import resolve
        from fqa.tasks.base import Task
        from fqa.tasks.trainable import select_trainable

        placement = resolve("cuda", "bf16")
        torch.manual_seed(0)
        model = timm.create_model(model_name, pretrained=False, num_classes=10).eval()
        select_trainable(model, trainable, 1)
        x = torch.randn(rows, 3, 224, 224, device=placement.device)
        y = torch.randint(0, 10, (rows,), device=placement.device)

        class ImageTask(Task):
            def __init__(self):
                self.model, self.placement = model.to(placement.device), placement

            def _loss(self, ids):
                index = torch.as_tensor(np.asarray(ids), device=placement.device) % rows
                with placement.autocast():
                    return F.cross_entropy(self.model(x[index]).float(), y[index], reduction="none")

            def losses(self, ids):
                with torch.inference_mode():
                    return self._loss(ids)

            def prepass(self, ids):
                loss = self.losses(ids).double().cpu().numpy()
                return {"loss": loss, "correct": np.zeros(len(ids), bool)}

            def backprop_loss(self, ids):
                return self._loss(ids).mean()

            def evaluate(self, split):
                return {}

            def train_ids(self):
                return np.arange(rows)

        return ImageTask()


def _timed(fn, reps: int) -> float:
    fn()  # warm-up (kernels, autocast caches)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / reps


def _peak(fn) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure_throughput(
    model_name: str = "vit_base_patch16_224", rows: int = 64, reps: int = 5
) -> dict:
    from fqa.estimators import create_estimator

    task = _ImageTask(model_name, rows)
    ids = np.arange(rows)
    baselines = task.prepass(ids)["loss"]
    spsa = create_estimator("spsa", epsilon=1e-2)
    lr = create_estimator("lr", sigma=0.1)
    spsa_shard = spsa.plan(ids, np.ones(rows, int), baselines, 0, rows)[0]  # 2·rows queries
    lr_shard = lr.plan(ids[: rows // 2], np.ones(rows // 2, int), baselines[: rows // 2], 0, rows)[
        0
    ]

    def forward():
        with torch.inference_mode(), task.placement.autocast():
            task.model(torch.randn(rows, 3, 224, 224, device="cuda"))

    def backprop():
        with torch.enable_grad():
            task.backprop_loss(ids).backward()
        for _, p in task.trainable_parameters():
            p.grad = None

    seconds = {
        "forward": _timed(forward, reps),
        "spsa": _timed(lambda: spsa.evaluate(task, spsa_shard), reps),
        "lr": _timed(lambda: lr.evaluate(task, lr_shard), reps),
    }
    peak = {
        "forward": _peak(forward),
        "spsa_queries": _peak(lambda: spsa.evaluate(task, spsa_shard)),
        "lr_step": _peak(lambda: lr.estimate(task, [lr_shard])),
        "backprop_step": _peak(backprop),
    }
    inference = rows / seconds["forward"]
    spsa_qps = 2 * rows / seconds["spsa"]
    lr_qps = rows / seconds["lr"]  # rows//2 antithetic pairs = rows queries
    return {
        "model": model_name,
        "rows": rows,
        "precision": "bf16",
        "trainable_parameters": sum(p.numel() for _, p in task.trainable_parameters()),
        "inference_rows_per_s": inference,
        "spsa_queries_per_s": spsa_qps,
        "lr_queries_per_s": lr_qps,
        "spsa_vs_inference_speed": spsa_qps / inference,
        "lr_vs_inference_speed": lr_qps / inference,
        "peak_bytes": peak,
        "spsa_vs_inference_peak": peak["spsa_queries"] / peak["forward"],
        "lr_step_vs_backprop_peak": peak["lr_step"] / peak["backprop_step"],
    }


def run_ray_pair(out_dir: Path, timeout: int = 150) -> dict:
    """jobs.train with 2 workers on 0.5 GPU each (the cluster layer places them)."""
    started = time.perf_counter()
    settings = [
        "run.name=gpu_check_pair",
        f"run.out_dir={out_dir}",
        "run.device=auto",
        "cluster.num_workers=2",
        "cluster.gpus_per_worker=0.5",
        "pretrain.enabled=false",
        "train.steps=20",
        "train.progress=false",
        "train.eval_every=10",
        "train.checkpoint_every=10",
        "cluster.checksum_every=5",
    ]
    command = [
        sys.executable,
        "-m",
        "jobs.train",
        "--config",
        "jobs/configs/vit_digits_ten_classes.yaml",
    ]
    for setting in settings:
        command += ["--set", setting]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    try:
        summary = json.loads(lines[-1]) if lines else None
    except ValueError:
        summary = None
    return {
        "returncode": proc.returncode,
        "summary": summary,
        "stderr_tail": proc.stderr[-2000:],
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.gpu_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--skip", default="", help="comma separated: tests,throughput,ray")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); run it on a GPU machine",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    skip = set(filter(None, args.skip.split(",")))
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    out = Path(args.out)

    def save() -> None:  # after every part: a part that dies leaves the others' figures
        out.write_text(json.dumps(report, indent=1))

    for name, part in (
        ("tests", run_gpu_tests),
        ("throughput", measure_throughput),
        ("ray_pair", lambda: run_ray_pair(out.resolve().parent / "gpu_check_runs")),
    ):
        if name.split("_")[0] in skip:
            continue
        try:
            report[name] = part()
        except Exception as exc:  # record and go on: one JSON with everything that ran
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        save()
    print(json.dumps({k: v for k, v in report.items() if k != "tests"}, indent=1))
    return 0 if all("error" not in v for v in report.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
