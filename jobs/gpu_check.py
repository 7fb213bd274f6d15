"""``python -m jobs.gpu_check --out gpu_check.json``: the checks that need a CUDA GPU.

1. the ``gpu``-marked tests (device-parametrised unbiasedness, spsa replay bit-identical
   across CPU and CUDA, a resumed run on CUDA);
2. the throughput benchmark's measurement (``python -m jobs.bench throughput``, the same
   code) at 64 rows on CUDA for timm ViT-S/16 and ViT-B/16 and open_clip ViT-B/32 (random
   init, fp32, full fine-tuning; ViT-B/16 also with its last block): spsa and lr
   queries/s ÷ inference rows/s, spsa peak ÷ inference peak, lr (two_pass, recompute_hidden) step
   peak ÷ backprop step peak (``torch.cuda.synchronize`` around timings,
   ``max_memory_allocated`` after ``reset_peak_memory_stats``, above what was held
   before the call: weights and data);
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

import torch


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


def measure_throughput(rows: int = 64, reps: int = 3) -> dict:
    """The throughput benchmark's own measurement (``benchmarks.throughput.measure``:
    an unperturbed query as the baseline, interleaved repetitions, CUDA peaks) on the
    three real models at ``rows`` rows: full fine-tuning, and ViT-B/16's last block."""
    from benchmarks.common import DEFAULT_CONFIG
    from benchmarks.throughput import REAL_MODELS, measure

    args = argparse.Namespace(quick=False, config=DEFAULT_CONFIG, device="cuda")
    cells = [(model, "full") for model in REAL_MODELS] + [("vit_base_patch16_224", "last_blocks")]
    results = []
    for model, trainable in cells:
        started = time.perf_counter()
        result = measure(args, model, trainable, rows, reps)
        results.append({**result, "seconds": time.perf_counter() - started})
        torch.cuda.empty_cache()
    return {"rows": rows, "results": results}


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
