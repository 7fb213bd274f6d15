"""``python -m jobs.bench throughput``: what a query costs against plain inference.

For each model (``--models``: timm ViT-S/16 and ViT-B/16 and open_clip ViT-B/32's image
tower at 224 px, random initialisation; ``tiny``/``--quick``: the tests' ViT), each
trainable mode and each sub-batch of rows (``--device cuda`` on a GPU):

* **speed** — queries/s of each estimator's ``evaluate`` on one shard (a ``spsa``
  shard is 2 queries per row: θ±εu; an antithetic ``lr`` shard 2 per row: ±ε) against
  rows/s of inference on the same rows: the task's unperturbed losses under
  ``torch.inference_mode()`` — the batch gathered from the dataset, one forward, the
  loss — which is the physical floor of a query (every query pays the gather, so a
  baseline on pre-gathered inputs would bill the estimator for the input batch: at 32
  rows of 224 px that is 19 MB, the whole of spsa's apparent 1.17× on ViT-S/16). Methods are timed in interleaved repetitions and the
  ratio is the median of the per-repetition ratios, so machine load cancels out.
* **peak memory** — the highest amount of tensor storage alive at once *above what
  existed before* (parameters, data), from the PyTorch profiler's memory timeline
  (``profile_memory``: every CPU allocation and free of a tensor storage, exact to the
  byte, independent of the process RSS and of other processes). Measured for the plain
  forward, each estimator's queries (``evaluate``) and its whole step (``evaluate`` +
  ``write_grad``, which allocates the ``.grad`` buffers), and a backpropagation step
  (forward + backward into fresh ``.grad``) of the same trainable parameters
  (on CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``).
* ``lr`` keeps every hooked layer's input until the loss is known
  (``recompute_hidden: false``); ``lrh`` is the default, ``recompute_hidden`` (each
  MLP's hidden activation recomputed from the MLP's input instead of kept); ``lr2`` is
  ``two_pass`` (a second, accumulating forward, nothing kept); ``backprop`` is also
  timed.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import add_common_arguments, save_figure, write_report
from fqa.config import load_config
from fqa.data import ImageDataset
from fqa.device import resolve
from fqa.host_memory import release_freed_memory
from fqa.plots import plt
from fqa.progress import progress
from fqa.setup import build_estimator, build_task, load_data, prepare_host
from fqa.tasks.image_classification import ImageClassificationTask
from fqa.tasks.models import TINY_VIT, create_timm_model
from fqa.tasks.trainable import select_trainable

METHODS = ("forward", "spsa", "lr", "lr2", "lrh", "backprop")
# lr: every layer input kept; lrh: the default, recompute_hidden (MLP hidden activations
# recomputed, not stored); lr2: two_pass (a second accumulating forward, nothing stored)
ESTIMATORS = {
    "spsa": {"estimator.name": "spsa"},
    "lr": {"estimator.name": "lr", "estimator.recompute_hidden": False},
    "lr2": {"estimator.name": "lr", "estimator.two_pass": True},
    "lrh": {"estimator.name": "lr", "estimator.recompute_hidden": True},
}
# The sizes people fine-tune, at 224 px, randomly initialised (weights do not change a
# query's cost): timm name, or "open_clip:<name>" for an open_clip image tower + head.
REAL_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "open_clip:ViT-B-32")
NUM_CLASSES = 10  # the bundled digits


def peak_bytes(fn, device: torch.device | None = None) -> int:
    """Peak tensor storage allocated by ``fn()``, above what existed before it.

    CPU: from the PyTorch profiler's memory timeline (every allocation and free of a
    tensor storage). CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``.
    One method per device, so every column of a row is measured the same way."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    release_freed_memory()  # the profiler's records and the last workload's holes
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
    del prof
    release_freed_memory()
    return peak


class ClipImageClassifier(nn.Module):
    """An open_clip image tower and a linear head: CLIP fine-tuned as a classifier.

    ``blocks``/``norm``/``get_classifier`` are the names ``select_trainable`` looks for
    (timm's), so trainable modes mean the same for every model of the benchmark."""

    def __init__(self, name: str, num_classes: int) -> None:
        super().__init__()
        import open_clip

        # random initialisation: nothing is downloaded
        self.visual = open_clip.create_model(name, pretrained=None).visual
        self.head = nn.Linear(self.visual.output_dim, num_classes)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def norm(self) -> nn.Module:
        return self.visual.ln_post

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images))


def _real_model(name: str) -> nn.Module:
    if name.startswith("open_clip:"):
        return ClipImageClassifier(name.split(":", 1)[1], NUM_CLASSES).eval()
    return create_timm_model(name, NUM_CLASSES, {})  # 3 channels, 224 px


def _real_task(name: str, config, rows: int) -> ImageClassificationTask:
    """``rows`` digits at 224 px in RGB (the gray channel repeated), placed where
    ``run.device``/``run.precision`` say (the task moves model and batches there)."""
    prepare_host(config)  # as build_task does
    splits, _ = load_data(config)
    train = splits["train"]
    n = min(rows, len(train))
    small = ImageDataset(
        ids=train.ids[:n].clone(),
        images=train.images[:n].expand(-1, 3, -1, -1),
        labels=train.labels[:n],
        num_classes=NUM_CLASSES,
    )
    torch.manual_seed(config.run.seed)
    model = _real_model(name)
    if not select_trainable(model, config.trainable.mode, config.trainable.blocks):
        raise ValueError(f"trainable.mode={config.trainable.mode} selects nothing in {name}")
    placement = resolve(config.run.device, config.run.precision)
    return ImageClassificationTask(model, {"train": small}, 224, placement=placement)


def _setup(args, model: str | None, column: str, trainable: str, rows: int):
    """The task and estimator of one column; ``model`` None: the config's (tiny) model."""
    overrides = {
        **ESTIMATORS[column],
        "trainable.mode": trainable,
        "model.checkpoint": None,  # weights do not change a query's cost
        "pretrain.enabled": False,
        "estimator.shard_rows": rows,
        "train.progress": False,
        "run.device": args.device,  # the task places model and batches
    }
    if args.quick:  # the test suite's tiny ViT
        overrides["model.kwargs"] = TINY_VIT
    config = load_config(args.config, overrides)
    task = build_task(config) if model is None else _real_task(model, config, rows)
    est = build_estimator(config, task)  # lr: freezes what it cannot estimate
    ids = task.train_ids()[:rows]
    shard = est.plan(ids, np.ones(rows, dtype=int), task.prepass(ids)["loss"], 0, rows)[0]
    return task, est, shard


def _clear_grads(task) -> None:
    for _, p in task.trainable_parameters():
        p.grad = None


def _backprop_step(task, ids) -> None:
    with torch.enable_grad():
        task.backprop_loss(ids).backward()


def measure(args, model: str | None, trainable: str, rows: int, reps: int) -> dict:
    """Speeds (interleaved repetitions) and peak memories of every method at one size."""
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tasks = {name: _setup(args, model, name, trainable, rows) for name in ESTIMATORS}
    task, _, shard = tasks["spsa"]
    ids = np.asarray(shard.ids)

    def forward():  # an unperturbed query: gather, forward, loss
        task.losses(ids)

    def query(name):
        t, est, s = tasks[name]
        return lambda: est.evaluate(t, s).queries

    def backprop():
        _clear_grads(task)
        _backprop_step(task, np.asarray(shard.ids))
        return rows

    calls = {
        "forward": lambda: (forward(), rows)[1],
        "spsa": query("spsa"),
        "lr": query("lr"),
        "lr2": query("lr2"),
        "lrh": query("lrh"),
        "backprop": backprop,
    }
    for fn in calls.values():
        fn()  # warm-up
    per_rep: dict[str, list[float]] = {m: [] for m in METHODS}  # queries (rows) per second
    for _ in range(reps):
        for name in METHODS:  # interleaved: every method sees the same load
            sync()
            started = time.perf_counter()
            count = calls[name]()
            sync()
            per_rep[name].append(count / (time.perf_counter() - started))
    _clear_grads(task)
    ratio = {
        name: statistics.median(
            q / f for q, f in zip(per_rep[name], per_rep["forward"], strict=True)
        )
        for name in METHODS[1:]
    }

    memory: dict[str, int] = {"forward": peak_bytes(forward, device)}
    for name in ESTIMATORS:
        t, est, s = tasks[name]
        _clear_grads(t)
        memory[f"{name}_queries"] = peak_bytes(lambda t=t, est=est, s=s: est.evaluate(t, s), device)
        _clear_grads(t)
        memory[f"{name}_step"] = peak_bytes(lambda t=t, est=est, s=s: est.estimate(t, [s]), device)
        _clear_grads(t)
        memory[f"{name}_trainable_parameters"] = sum(p.numel() for _, p in t.trainable_parameters())
    # backpropagation of what lr trains (its Linear layers; lr2 trains the same set)
    t, _, s = tasks["lr"]
    memory["lr_backprop_step"] = peak_bytes(lambda: _backprop_step(t, np.asarray(s.ids)), device)
    _clear_grads(t)
    return {
        "model": model or "tiny",
        "trainable": trainable,
        "rows": rows,
        "reps": reps,
        "device": str(device),
        "per_second_median": {m: statistics.median(v) for m, v in per_rep.items()},
        "fraction_of_forward": ratio,
        "peak_bytes": memory,
        "spsa_queries_vs_forward_memory": memory["spsa_queries"] / memory["forward"],
        "lr_step_vs_backprop_memory": memory["lr_step"] / memory["lr_backprop_step"],
        "lr2_step_vs_backprop_memory": memory["lr2_step"] / memory["lr_backprop_step"],
        "lrh_step_vs_backprop_memory": memory["lrh_step"] / memory["lr_backprop_step"],
    }


def _model_spec(spec: str) -> tuple[str | None, list[int]]:
    """``name`` or ``name@rows`` (its own rows, e.g. ``tiny@64``); ``tiny``: the config's."""
    name, _, rows = spec.partition("@")
    try:
        sizes = [int(rows)] if rows else []
    except ValueError:
        raise ValueError(f"--models entry {spec!r}: rows after @ must be an integer") from None
    return (None if name == "tiny" else name), sizes


def run(args) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    quick = args.quick
    if quick:
        cells = [(None, "full", r) for r in (16, 64)]
    else:
        sizes = [int(s) for s in args.rows.split(",")]
        modes = args.trainable.split(",")
        cells = [
            (model, mode, r)
            for model, own_sizes in map(_model_spec, args.models.split(","))
            for mode in modes
            for r in own_sizes or sizes
        ]
    results = []
    for model, mode, rows in progress(cells, len(cells), "throughput", enabled=not quick, every=1):
        results.append(measure(args, model, mode, rows, 3 if quick else args.reps))
        if not quick:
            print(format_report({"results": results[-1:]}).splitlines()[-1], flush=True)
    report = {"threads": args.threads, "device": args.device, "results": results}
    write_report(args.out, "throughput", report, _plot)
    print(format_report(report))
    return report


def format_report(report: dict) -> str:
    """One row per (model, trainable, rows); the target ratios at the right.

    lr2 is lr with ``two_pass`` (a second accumulating forward instead of stored inputs),
    lrh with ``recompute_hidden`` (MLP hidden activations recomputed, not stored)."""
    lines = [
        f"{'model':<22} {'trainable':<11} {'rows':>4} {'params':>7} {'fwd rows/s':>10} "
        f"{'spsa q/s':>8} {'lr q/s':>7} {'lr2 q/s':>7} {'lrh q/s':>7} {'bp s/step':>9} | "
        f"peak MB: {'fwd':>6} {'spsa':>6} {'lr':>6} {'lr2':>6} {'lrh':>6} {'bp':>6} | "
        f"{'lr/bp':>5} {'lr2/bp':>6} {'lrh/bp':>6} {'lr/fwd':>6} {'lr2/fwd':>7} {'lrh/fwd':>7} "
        f"{'spsa/fwd':>8} {'spsa/fwd mem':>12}"
    ]
    mb = 1e-6
    for r in report["results"]:
        m, s, f = r["peak_bytes"], r["per_second_median"], r["fraction_of_forward"]
        params = m["spsa_trainable_parameters"] / 1e6
        lines.append(
            f"{r.get('model', 'tiny'):<22} {r['trainable']:<11} {r['rows']:>4} {params:>6.2f}M "
            f"{s['forward']:>10.2f} {s['spsa']:>8.2f} {s['lr']:>7.2f} {s['lr2']:>7.2f} "
            f"{s['lrh']:>7.2f} {r['rows'] / s['backprop']:>9.3f} | {'':>8} "
            f"{m['forward'] * mb:>6.1f} {m['spsa_queries'] * mb:>6.1f} {m['lr_step'] * mb:>6.1f} "
            f"{m['lr2_step'] * mb:>6.1f} {m['lrh_step'] * mb:>6.1f} "
            f"{m['lr_backprop_step'] * mb:>6.1f} | {r['lr_step_vs_backprop_memory']:>5.2f} "
            f"{r['lr2_step_vs_backprop_memory']:>6.2f} {r['lrh_step_vs_backprop_memory']:>6.2f} "
            f"{f['lr']:>6.2f} {f['lr2']:>7.2f} {f['lrh']:>7.2f} "
            f"{f['spsa']:>8.2f} {r['spsa_queries_vs_forward_memory']:>12.2f}"
        )
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    """Speed (fraction of inference) and memory ratios per workload, as grouped bars."""
    results = report["results"]
    labels = [f"{r.get('model', 'tiny')}\n{r['trainable']} {r['rows']}" for r in results]
    at = np.arange(len(results))
    fig, axes = plt.subplots(1, 2, figsize=(max(11, 1.2 * len(results)), 4.5))
    for k, name in enumerate(METHODS[1:]):
        axes[0].bar(
            at + (k - 2) * 0.16,
            [r["fraction_of_forward"][name] for r in results],
            0.16,
            label=name,
        )
    for k, (key, value) in enumerate(
        (
            ("spsa queries ÷ inference", lambda r: r["spsa_queries_vs_forward_memory"]),
            ("lr step ÷ backprop", lambda r: r["lr_step_vs_backprop_memory"]),
            ("lr2 step ÷ backprop", lambda r: r["lr2_step_vs_backprop_memory"]),
            ("lrh step ÷ backprop", lambda r: r["lrh_step_vs_backprop_memory"]),
        )
    ):
        axes[1].bar(at + (k - 1.5) * 0.2, [value(r) for r in results], 0.2, label=key)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set(ylabel="queries/s ÷ inference rows/s")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set(ylabel="peak tensor memory ratio")
    for ax in axes:
        ax.set_xticks(at, labels, fontsize=6, rotation=60, ha="right")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def add_arguments(parser) -> None:
    add_common_arguments(parser, runs=False)
    parser.add_argument("--trainable", default="full,last_blocks", help="comma separated modes")
    parser.add_argument(
        "--models",
        default=",".join(REAL_MODELS),
        help="comma separated: timm names, open_clip:<name> (image tower + head), tiny "
        "(the config's model); name@rows gives that model its own rows per shard",
    )
    parser.add_argument("--rows", default="4", help="rows per shard, comma separated")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (e.g. with --rows 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
