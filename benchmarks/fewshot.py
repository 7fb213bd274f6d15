"""``python -m jobs.bench fewshot``: the FLOPS paper's few-shot protocol at equal total queries.

Protocol (issue 15, item 1):

* **Source task.** The backbone (the config's timm ViT) is pretrained with
  backpropagation on the ``pretrain.classes`` digits only (``fqa.backprop.ensure_pretrained``,
  cached). No row or label of the target classes is seen there.
* **Target task.** The other classes, relabelled 0..K-1. A fixed stratified half of
  their rows is the test split (the same for every seed). Per seed, k rows per class
  (default 16) of the other half are the training set and the rest of that half is the
  validation split, so train, validation and test are disjoint.
* **What trains.** A fresh MLP head (initialised from the seed) over the frozen
  backbone's features, computed once per row: a step costs milliseconds.
* **Budget.** The paper's convention: the same per-datapoint query budget for every
  ``lr`` cell (default 10 queries, i.e. 5 antithetic samples on average, pre-pass not
  included), ``spsa`` at 2 (one central difference: MeZO), backprop counted as 3 forward
  equivalents per datapoint. Every run gets the same total queries (pre-pass
  included), so cheaper methods take more steps.
* **Step size.** Each cell at its own best ``train.lr``, chosen by a Ray Tune search
  (``--select tune``, the default): one ``ray.tune.Tuner`` per cell, a
  ``tune.grid_search`` over the ``--lrs`` grid, each trial running the cell at its step
  size on every seed and reporting only the seed-mean final *validation* accuracy; the
  best trial's step size is the cell's. Test accuracy never reaches Tune. A grid, not a
  log-uniform sample: every cell then has runs at the same step sizes, which the
  shared-step-size and count-weighting tables pair on, and four points half a decade apart
  already bracket every cell's optimum. ``--select grid`` is the same trials as a plain
  loop in this process (no Ray).
* **Training loop.** Forward-only cells run ``fqa.trainer.Trainer.step()``; backprop runs
  ``fqa.backprop.train_backprop`` on the same task and head (or a ``backprop`` estimator
  through the Trainer once one is registered).

Report (``fewshot.json``, ``fewshot.png``): final test accuracy with a 95% t-interval over
seeds, queries to reach the best uniform cell's final accuracy with a paired bootstrap
interval over seeds, G* = mean v / (mean √v)² over the training set and the allocation
spread (coefficient of variation of the counts) over training.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.tune import Callback
from torch import nn

from fqa.plots import plt
from fqa.tasks.backbone_features import FeatureHeadTask, FeatureSplit, make_head

EVALUATIONS = 20  # test evaluations per run, at equal fractions of the total queries
BOOTSTRAP = 2000
BACKPROP_Q = 3  # forward equivalents per datapoint of one backprop step (fqa.backprop)


# ---------------------------------------------------------------------------- the cells


@dataclass(frozen=True)
class Cell:
    """One method of the comparison: estimator, allocator and queries per datapoint."""

    label: str
    estimator: str  # lr | spsa | backprop
    allocator: str
    q: int  # queries per datapoint per step, pre-pass excluded (backprop: 3 equivalents)
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def forward_only(self) -> bool:
        return self.estimator != "backprop"

    def queries_per_step(self, batch: int) -> int:
        # forward-only: one pre-pass query per datapoint plus q perturbed ones
        return batch * (self.q + 1 if self.forward_only else self.q)


def count_weighting_available() -> bool:
    """Whether fqa has the biased ``estimator.weighting: count`` ablation option."""
    from fqa.config import EstimatorConfig

    return "weighting" in EstimatorConfig.model_fields


def cells(q: int = 10, mezo_q: int = 2) -> list[Cell]:
    out = [
        Cell("backprop", "backprop", "-", BACKPROP_Q),
        Cell(f"spsa/uniform q={mezo_q} (MeZO)", "spsa", "uniform", mezo_q),
    ]
    out += [
        Cell(f"lr/{a} q={q}", "lr", a, q) for a in ("uniform", "neyman", "gaussian", "bernoulli")
    ]
    if count_weighting_available():  # the authors' count weighting, beside the unbiased ones
        # only non-uniform allocators: with equal counts, count weighting is the estimator
        out += [
            Cell(f"lr/{a} q={q} weighting=count", "lr", a, q, {"estimator.weighting": "count"})
            for a in ("neyman", "gaussian")
        ]
    return out


def equal_budget(requested: int, batch: int, chosen: list[Cell]) -> int:
    """The smallest total >= requested that every cell spends exactly, with every one of
    the EVALUATIONS points on a step boundary (so all curves share their query axis)."""
    unit = math.lcm(*(c.queries_per_step(batch) for c in chosen)) * EVALUATIONS
    return max(1, math.ceil(requested / unit)) * unit


# ---------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class TargetPool:
    """Backbone features of every target-class row (the rows pretraining never saw)."""

    ids: np.ndarray  # int64 [n]: global digits indices
    labels: np.ndarray  # int64 [n]: relabelled 0..K-1
    features: torch.Tensor  # float32 [n, E]
    classes: list[int]  # original digit of each new label
    source_classes: list[int]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def target_pool(config, feature_block: int = 1) -> TargetPool:
    """Pretrain (or reuse) the source backbone, then encode every row once: the patch
    tokens after block ``feature_block``, flattened, standardised with the source rows'
    statistics (the later blocks specialise in the source classes). The encoder is the
    ``backbone_features`` task's (``fqa.tasks.backbone_features``)."""
    from fqa.backprop import ensure_pretrained
    from fqa.data import ensure_digits, load_splits
    from fqa.tasks.backbone_features import block_features, load_backbone, standardise

    if config.data.classes is not None:
        raise ValueError(
            f"data.classes={config.data.classes} is set, but the few-shot target classes are "
            "the complement of pretrain.classes; remove data.classes from the config"
        )
    source = sorted(config.pretrain.classes)
    backbone = load_backbone(config, ensure_pretrained(config, progress=False))
    if config.data.dataset == "digits":
        splits = ensure_digits(config.data.dir)
    else:
        splits = load_splits(config.data.dir)
    ids = torch.cat([s.ids for s in splits.values()])
    images = torch.cat([s.images for s in splits.values()])
    labels = torch.cat([s.labels for s in splits.values()])
    num_classes = splits["train"].num_classes
    classes = [c for c in range(num_classes) if c not in source]
    if len(classes) < 2:
        raise ValueError(
            f"pretrain.classes={source} leaves {classes} of the {num_classes} classes for the "
            "target task; keep at least two classes out of pretrain.classes"
        )
    features = block_features(backbone, images, config.model.input_size, feature_block)
    keep = torch.isin(labels, torch.tensor(classes))
    # standardised with the source rows: pretraining data, so no target leakage
    features = standardise(features[keep], features[~keep])
    relabel = torch.searchsorted(torch.tensor(classes), labels[keep])
    return TargetPool(ids[keep].numpy(), relabel.numpy(), features, classes, source)


def kshot_split(
    labels: np.ndarray, k: int, seed: int, test_fraction: float = 0.5
) -> dict[str, np.ndarray]:
    """Row positions of train (k per class, drawn per seed), validation (the rest of the
    non-test rows) and test (a fixed stratified fraction, the same for every seed)."""
    fixed = np.random.default_rng(20240521)  # the test split never depends on the seed
    per_seed = np.random.default_rng([seed, 16])
    parts: dict[str, list[np.ndarray]] = {"train": [], "validation": [], "test": []}
    for c in np.unique(labels):
        rows = fixed.permutation(np.flatnonzero(labels == c))
        cut = int(round(test_fraction * len(rows)))
        test, rest = rows[:cut], rows[cut:]
        if len(rest) <= k:
            raise ValueError(
                f"class {c} has {len(rest)} non-test rows, not enough for k={k} training "
                f"examples plus validation; lower --k (at most {len(rest) - 1})"
            )
        rest = per_seed.permutation(rest)
        parts["train"].append(rest[:k])
        parts["validation"].append(rest[k:])
        parts["test"].append(test)
    return {name: np.sort(np.concatenate(p)) for name, p in parts.items()}


# ---------------------------------------------------------------------------- the task


def feature_task(head: nn.Module, pool: TargetPool, rows: dict[str, np.ndarray]):
    """The ``backbone_features`` head task over the pool's rows ``rows[split]``."""
    return FeatureHeadTask(
        head,
        {
            name: FeatureSplit(pool.ids[r], pool.features[r], torch.tensor(pool.labels[r]))
            for name, r in rows.items()
        },
    )


# ---------------------------------------------------------------------------- one run


def allocation_gain(stats, ids: np.ndarray, variance_scale: float) -> float:
    """G* = mean v / (mean √v)² over the observed datapoints (1 = nothing to gain)."""
    count, _, second_moment = stats.lookup(ids)
    v = second_moment[count > 0] * variance_scale
    if len(v) == 0 or not np.sqrt(v).mean() > 0:
        return float("nan")
    return float(v.mean() / np.sqrt(v).mean() ** 2)


def run_one(
    config, cell: Cell, pool: TargetPool, rows: dict[str, np.ndarray], total: int, hidden: int
) -> dict[str, Any]:
    """One (cell, seed, step size) run on its own k-shot task; curves against queries."""
    from fqa.backprop import train_backprop
    from fqa.config import with_overrides
    from fqa.estimators import list_estimators
    from fqa.trainer import Trainer

    batch = config.train.batch_size
    steps = total // cell.queries_per_step(batch)
    estimator = cell.estimator
    through_trainer = cell.forward_only or estimator in list_estimators()
    config = with_overrides(
        config,
        {
            "estimator.name": estimator if through_trainer else "lr",
            "allocator.name": "uniform" if cell.allocator == "-" else cell.allocator,
            "train.queries_per_datapoint": cell.q if cell.forward_only else 2,
            "train.steps": steps,
            "train.eval_every": steps,
            **cell.overrides,
        },
    )
    seed = config.run.seed
    head = make_head(pool.features.shape[1], hidden, pool.num_classes, seed)
    task = feature_task(head, pool, rows)
    started = time.perf_counter()
    record: dict[str, Any] = {
        "cell": cell.label,
        "seed": seed,
        "lr": config.train.lr,
        "steps": steps,
    }
    if not through_trainer:
        result = train_backprop(task, config, steps, progress=False)
        record.update(
            queries=steps * batch * cell.q,
            test_accuracy=result["test_accuracy"],
            val_accuracy=result["val_accuracy"],
        )
    else:
        trainer = Trainer(config, task=task)
        eval_at = {steps * k // EVALUATIONS for k in range(1, EVALUATIONS + 1)}
        curve: dict[str, list] = {
            k: []
            for k in ("queries", "test_accuracy", "gain_star", "alloc_cv", "alloc_max_over_min")
        }
        window_cv, window_ratio = [], []
        metrics: dict[str, Any] = {}
        while trainer.global_step < steps:
            metrics = trainer.step()
            window_cv.append(metrics["alloc_cv"])
            window_ratio.append(metrics["alloc_max"] / metrics["alloc_min"])
            if trainer.global_step in eval_at:
                curve["queries"].append(trainer.queries)
                curve["test_accuracy"].append(task.evaluate("test")["accuracy"])
                curve["gain_star"].append(
                    allocation_gain(trainer.stats, task.train_ids(), trainer.variance_scale)
                )
                curve["alloc_cv"].append(float(np.mean(window_cv)))
                curve["alloc_max_over_min"].append(float(np.mean(window_ratio)))
                window_cv, window_ratio = [], []
        record.update(
            queries=trainer.queries,
            test_accuracy=curve["test_accuracy"][-1],
            val_accuracy=metrics["val_accuracy"],
            curve=curve,
        )
    record["seconds"] = time.perf_counter() - started
    return record


# ---------------------------------------------------------------------------- step sizes

SELECTION = {
    "tune": "Ray Tune per cell: tune.grid_search over the lr grid, each trial the cell on "
    "every seed at one lr reporting the seed-mean final validation accuracy (mode max); "
    "the best trial's runs are the reported ones (test accuracy never reaches Tune)",
    "grid": "grid over the same trainer, best seed-mean final validation",
}


def best_step_size(val_by_lr: dict[float, list[float]]) -> float:
    """The step size with the best seed-mean validation accuracy (ties: the first)."""
    return max(val_by_lr, key=lambda lr: float(np.mean(val_by_lr[lr])))


def cell_runs(
    base, cell: Cell, pool: TargetPool, splits: dict, total: int, hidden: int, lr: float
) -> list[dict[str, Any]]:
    """One cell at one step size on every seed: one Tune trial (or one grid point)."""
    from fqa.config import with_overrides

    return [
        run_one(
            with_overrides(base, {"run.seed": seed, "train.lr": lr}),
            cell,
            pool,
            splits[seed],
            total,
            hidden,
        )
        for seed in sorted(splits)
    ]


def _tune_trial(
    params: dict[str, Any],
    *,
    base,
    cell: Cell,
    pool: TargetPool,
    splits: dict,
    total: int,
    hidden: int,
    records: str,
    module: str,
) -> None:
    """The Tune trainable: ``cell_runs`` at ``params['train.lr']``. Tune gets the
    validation accuracies only; the runs (test curves included) go to ``records``."""
    from ray import tune

    if str(Path(__file__).resolve()) != module:  # a Ray worker importing another checkout
        raise RuntimeError(
            f"the Tune trial imported {Path(__file__).resolve()}, the driver {module}: put "
            "the repository on PYTHONPATH as an absolute path"
        )
    torch.set_num_threads(1)  # as in the driver: identical runs in either process
    # arguments come read-only from Ray's object store; the runs get their own copies
    pool = TargetPool(
        pool.ids.copy(),
        pool.labels.copy(),
        pool.features.clone(),
        pool.classes,
        pool.source_classes,
    )
    splits = {s: {n: np.array(r) for n, r in v.items()} for s, v in splits.items()}
    lr = float(params["train.lr"])
    runs = cell_runs(base, cell, pool, splits, total, hidden, lr)
    path = Path(records) / f"{tune.get_context().get_trial_id()}.json"
    path.write_text(json.dumps(runs))
    val = [r["val_accuracy"] for r in runs]
    tune.report({"val_accuracy": float(np.mean(val)), "val_by_seed": val, "lr": lr})


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def select_step_sizes(
    how: str,
    base,
    chosen: list[Cell],
    pool: TargetPool,
    splits: dict,
    total: int,
    hidden: int,
    grid: list[float],
    runs_dir: str,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every cell at every grid step size on every seed, and each cell's selected step
    size: ``how='tune'`` one Ray Tune grid search per cell (an embedded Ray instance of
    one CPU unless this process already has Ray), ``'grid'`` the same trials in a loop."""
    from tqdm.auto import tqdm

    runs: list[dict[str, Any]] = []
    selection: dict[str, dict[str, Any]] = {}
    if how == "grid":
        for cell in tqdm(chosen, desc="few-shot cells", leave=False):
            by_lr = {lr: cell_runs(base, cell, pool, splits, total, hidden, lr) for lr in grid}
            val = {lr: [r["val_accuracy"] for r in g] for lr, g in by_lr.items()}
            selection[cell.label] = {
                "lr": best_step_size(val),
                "val_by_lr": {str(lr): float(np.mean(v)) for lr, v in val.items()},
            }
            runs += [r for g in by_lr.values() for r in g]
        return runs, selection
    import ray
    from ray import tune

    from cluster.runtime import connect

    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # trials read the driver's relative paths
    # Tune's new console output prints a configuration box per Tuner whatever the
    # verbosity; the legacy one honours verbose=0 (our callback prints a line per trial)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    owns = connect(num_cpus=1)  # the runs are single-threaded and the machine shared
    root = (Path(runs_dir) / "fewshot_tune").resolve()
    try:
        for cell in chosen:
            name = _slug(cell.label)
            shutil.rmtree(root / name, ignore_errors=True)  # scratch: a fresh search per run
            records = root / name / "records"
            records.mkdir(parents=True)
            trainable = tune.with_parameters(
                _tune_trial,
                base=base,
                cell=cell,
                pool=pool,
                splits=splits,
                total=total,
                hidden=hidden,
                records=str(records),
                module=str(Path(__file__).resolve()),
            )
            tuner = tune.Tuner(
                tune.with_resources(trainable, {"cpu": 1}),
                param_space={"train.lr": tune.grid_search(list(grid))},
                tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", reuse_actors=True),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=str(root),
                    verbose=0,  # no status table: one line per trial instead
                    callbacks=[_TrialLine(cell.label, len(grid))],
                    failure_config=tune.FailureConfig(max_failures=0),
                ),
            )
            results = tuner.fit()
            errors = [r.error for r in results if r.error is not None]
            if errors:
                raise RuntimeError(f"{cell.label}: {len(errors)} trial(s) failed") from errors[0]
            best = results.get_best_result(metric="val_accuracy", mode="max", scope="last")
            trials = sorted(results, key=lambda r: r.metrics["lr"])
            selection[cell.label] = {
                "lr": best.metrics["lr"],
                "val_by_lr": {str(r.metrics["lr"]): r.metrics["val_accuracy"] for r in trials},
                "tune_dir": str(Path(runs_dir) / "fewshot_tune" / name),
            }
            for result in trials:
                path = records / f"{result.metrics['trial_id']}.json"
                runs += json.loads(path.read_text())
    finally:
        if owns:
            ray.shutdown()
    return runs, selection


class _TrialLine(Callback):
    """One line per finished trial (Tune's status table is off)."""

    def __init__(self, label: str, count: int) -> None:
        self.label, self.count, self.done = label, count, 0

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.done += 1
        last = trial.last_result or {}
        print(
            f"tune {self.label}: lr={trial.config['train.lr']:g} "
            f"val={last.get('val_accuracy', float('nan')):.4f} ({self.done}/{self.count})",
            flush=True,
        )


# ---------------------------------------------------------------------------- the bench


def run(args) -> dict[str, Any]:
    from fqa.config import load_config

    torch.set_num_threads(1)  # the machine is shared; runs are sequential
    if args.resummarise:
        return _write(json.loads((Path(args.out) / "fewshot.json").read_text()), args.out)
    if args.quick:
        args.seeds, args.lrs, args.total_queries, args.pretrain_epochs = 2, "0.001,0.003", 2000, 2
    if args.add_cells:
        return add_cells(args)
    overrides = {"pretrain.epochs": args.pretrain_epochs, "run.out_dir": args.runs}
    overrides["pretrain.cache_dir"] = args.cache_dir or str(Path(args.runs) / "cache")
    if args.data_dir:
        overrides["data.dir"] = args.data_dir
    base = load_config(args.config, overrides)
    started = time.perf_counter()
    pool = target_pool(base, args.feature_block)
    wanted = set(args.estimators.split(","))
    chosen = [
        c for c in cells(base.train.queries_per_datapoint, args.mezo_q) if c.estimator in wanted
    ]
    if args.cells:  # a subset of those, by label (e.g. an ablation beside its twins)
        labels = [x.strip() for x in args.cells.split(",") if x.strip()]
        unknown = sorted(set(labels) - {c.label for c in chosen})
        if unknown:
            raise ValueError(f"--cells: {unknown} not among {[c.label for c in chosen]}")
        chosen = [c for c in chosen if c.label in labels]
    if not any(c.estimator == "lr" and c.allocator == "uniform" for c in chosen):
        raise ValueError(f"--estimators={args.estimators} must include lr (the uniform reference)")
    total = equal_budget(args.total_queries, base.train.batch_size, chosen)
    grid = [float(x) for x in str(args.lrs).split(",")]
    splits = {seed: kshot_split(pool.labels, args.k, seed) for seed in range(args.seeds)}
    runs, selection = select_step_sizes(
        args.select, base, chosen, pool, splits, total, args.hidden, grid, args.runs
    )
    sizes = {name: len(rows) for name, rows in splits[0].items()}
    report = {
        "protocol": {
            "k": args.k,
            "seeds": args.seeds,
            "source_classes": pool.source_classes,
            "target_classes": pool.classes,
            "split_sizes": sizes,
            "feature_block": args.feature_block,
            "feature_dim": int(pool.features.shape[1]),
            "head_hidden": args.hidden,
            "batch_size": base.train.batch_size,
            "queries_per_datapoint": base.train.queries_per_datapoint,
            "mezo_queries_per_datapoint": args.mezo_q,
            "total_queries": total,
            "lr_grid": grid,
            "optimizer": base.train.optimizer,
            "stats_decay": base.allocator.stats_decay,
            "count_weighting": count_weighting_available(),
            "step_size_selection": SELECTION[args.select],
        },
        "splits_by_seed": {s: {n: r.tolist() for n, r in v.items()} for s, v in splits.items()},
        "pool_ids": pool.ids.tolist(),
        "cells": [asdict(c) for c in chosen],
        "runs": runs,
        "selection": selection,
    }
    report["wall_seconds"] = time.perf_counter() - started
    return _write(report, args.out)


def add_cells(args) -> dict[str, Any]:
    """Run only the cells named in --add-cells under OUT/fewshot.json's own protocol (its
    seeds, step-size grid, k, head and total queries) and merge their runs into it. The
    first stored lr run is re-run first: the merge is refused unless it reproduces exactly,
    so the new cells see the same backbone, k-shot sets and head inits as the old ones."""
    from fqa.config import load_config, with_overrides

    path = Path(args.out) / "fewshot.json"
    report = json.loads(path.read_text())
    p = report["protocol"]
    by_label = {
        c.label: c for c in cells(p["queries_per_datapoint"], p["mezo_queries_per_datapoint"])
    }
    wanted = [x.strip() for x in args.add_cells.split(",") if x.strip()]
    have = {c["label"] for c in report["cells"]}
    for label in wanted:
        if label not in by_label:
            raise ValueError(f"--add-cells: {label!r} is not a cell; choose from {list(by_label)}")
        if label in have:
            raise ValueError(f"--add-cells: {label!r} is already in {path}; drop it from the list")
    new = [by_label[x] for x in wanted]
    overrides = {"pretrain.epochs": args.pretrain_epochs, "run.out_dir": args.runs}
    overrides["pretrain.cache_dir"] = args.cache_dir or str(Path(args.runs) / "cache")
    if args.data_dir:
        overrides["data.dir"] = args.data_dir
    base = load_config(args.config, overrides)
    if base.train.batch_size != p["batch_size"]:
        raise ValueError(
            f"{args.config} has batch_size {base.train.batch_size}, {path} used "
            f"{p['batch_size']}; pass the config the stored runs used"
        )
    total = p["total_queries"]
    for cell in new:
        if total % (cell.queries_per_step(p["batch_size"]) * EVALUATIONS):
            raise ValueError(f"{cell.label} cannot spend {path}'s total {total} exactly")
    started = time.perf_counter()
    pool = target_pool(base, p["feature_block"])
    if pool.ids.tolist() != report["pool_ids"]:
        raise ValueError(f"the target pool differs from {path}'s: not the same data")
    splits = {
        int(s): {n: np.asarray(r) for n, r in v.items()}
        for s, v in report["splits_by_seed"].items()
    }
    known = {c["label"]: Cell(**c) for c in report["cells"]}

    def one(cell: Cell, seed: int, lr: float) -> dict[str, Any]:
        config = with_overrides(base, {"run.seed": seed, "train.lr": lr})
        return run_one(config, cell, pool, splits[seed], total, p["head_hidden"])

    check = next(r for r in report["runs"] if known[r["cell"]].estimator == "lr")
    again = one(known[check["cell"]], check["seed"], check["lr"])
    if again["curve"]["test_accuracy"] != check["curve"]["test_accuracy"]:
        raise RuntimeError(
            f"re-running {check['cell']} seed {check['seed']} lr {check['lr']} gave test curve "
            f"{again['curve']['test_accuracy']} instead of the stored "
            f"{check['curve']['test_accuracy']}: a different backbone or thread count; "
            "rerun the whole bench instead of merging"
        )
    select = "tune" if p["step_size_selection"] == SELECTION["tune"] else "grid"
    runs, selection = select_step_sizes(
        select, base, new, pool, splits, total, p["head_hidden"], p["lr_grid"], args.runs
    )
    report["runs"] += runs
    if "selection" in report:
        report["selection"].update(selection)
    report["cells"] += [asdict(c) for c in new]
    p["count_weighting"] = count_weighting_available()
    report.setdefault("added", []).append(
        {
            "cells": wanted,
            "wall_seconds": time.perf_counter() - started,
            "reproduced": check["cell"],
        }
    )
    return _write(report, args.out)


def weighting_table(runs: list[dict], chosen: list[Cell]) -> list[dict]:
    """Count weighting against the unbiased estimator with the same allocator, at each
    step size: final test accuracy paired over seeds (same k-shot set and head init)."""
    rows = []
    for cell in chosen:
        if cell.overrides.get("estimator.weighting") != "count":
            continue
        twin = f"lr/{cell.allocator} q={cell.q}"
        for lr in sorted({r["lr"] for r in runs if r["cell"] == cell.label}):
            mine, base = _group(runs, cell.label, lr), _group(runs, twin, lr)
            if [r["seed"] for r in mine] != [r["seed"] for r in base] or not base:
                continue
            diff = np.array(
                [a["test_accuracy"] - b["test_accuracy"] for a, b in zip(mine, base, strict=True)]
            )
            rows.append(
                {
                    "lr": lr,
                    "method": cell.label,
                    "unbiased": twin,
                    "test_mean": float(np.mean([r["test_accuracy"] for r in mine])),
                    "unbiased_test_mean": float(np.mean([r["test_accuracy"] for r in base])),
                    "diff_mean": float(diff.mean()),
                    "diff_ci95": _t_half_width(diff),
                }
            )
    return rows


def _write(report: dict, out: str) -> dict[str, Any]:
    """Summarise the runs into the tables, write fewshot.json and .png, print the tables."""
    chosen = [Cell(**c) for c in report["cells"]]
    sizes = report["protocol"]["split_sizes"]
    report["table"] = summarise(report["runs"], chosen, sizes, report.get("selection"))
    report["shared_lr"] = shared_lr_table(report["runs"], chosen)
    report["weighting"] = weighting_table(report["runs"], chosen)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "fewshot.json").write_text(json.dumps(report, indent=1))
    _plot(report, path / "fewshot.png")
    print(format_table(report))
    return report


def _t_half_width(values: np.ndarray) -> float:
    from scipy import stats

    if len(values) < 2:
        return float("nan")
    return float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))


def _first_crossing(queries: np.ndarray, curve: np.ndarray, target: float) -> float:
    hit = np.flatnonzero(curve >= target - 1e-9)
    return float(queries[hit[0]]) if len(hit) else float("inf")


def ratio_with_interval(
    curves: np.ndarray, reference: np.ndarray, reference_finals: np.ndarray, queries: np.ndarray
) -> tuple[float, float, list[float], float]:
    """Queries a cell's seed-mean curve needs to reach the reference's final mean accuracy,
    the reference's own, and a paired bootstrap 95% interval of their ratio over seeds
    (a seed is one k-shot set, so both sides resample the same seeds). Also the fraction
    of resamples in which the cell reaches the target at all."""

    def needed(idx: np.ndarray) -> tuple[float, float]:
        target = reference_finals[idx].mean()
        return (
            _first_crossing(queries, curves[idx].mean(0), target),
            _first_crossing(queries, reference[idx].mean(0), target),
        )

    seeds = len(reference_finals)
    point, own = needed(np.arange(seeds))
    resamples = np.random.default_rng(0).integers(0, seeds, size=(BOOTSTRAP, seeds))
    ratios = np.sort([np.divide(*needed(idx)) for idx in resamples])
    # order statistics: a resample that never reaches the target counts as +inf
    interval = [float(ratios[int(0.025 * BOOTSTRAP)]), float(ratios[int(0.975 * BOOTSTRAP) - 1])]
    return point, own, interval, float(np.isfinite(ratios).mean())


def _group(runs: list[dict], label: str, lr: float) -> list[dict]:
    return sorted(
        (r for r in runs if r["cell"] == label and r["lr"] == lr), key=lambda r: r["seed"]
    )


def shared_lr_table(runs: list[dict], chosen: list[Cell]) -> list[dict]:
    """Each lr allocator against lr/uniform at the *same* step size, for every grid point:
    separates the allocation's effect from the step-size selection's."""
    uniform = next(c for c in chosen if c.estimator == "lr" and c.allocator == "uniform")
    rows = []
    for lr in sorted({r["lr"] for r in runs}):
        base = _group(runs, uniform.label, lr)
        finals = np.array([r["test_accuracy"] for r in base])
        reference = np.array([r["curve"]["test_accuracy"] for r in base])
        queries = np.asarray(base[0]["curve"]["queries"], dtype=float)
        for cell in chosen:
            if cell.estimator != "lr" or cell == uniform:
                continue
            mine = _group(runs, cell.label, lr)
            curves = np.array([r["curve"]["test_accuracy"] for r in mine])
            point, own, interval, reached = ratio_with_interval(curves, reference, finals, queries)
            rows.append(
                {
                    "lr": lr,
                    "method": cell.label,
                    "target": float(finals.mean()),
                    "test_mean": float(np.mean([r["test_accuracy"] for r in mine])),
                    "queries_to_target": point,
                    "reference_queries_to_target": own,
                    "ratio": point / own,
                    "ratio_ci95": interval,
                    "ratio_reached_fraction": reached,
                }
            )
    return rows


def summarise(
    runs: list[dict], chosen: list[Cell], sizes: dict[str, int], selection: dict | None = None
) -> list[dict]:
    """Per cell at its selected step size (``selection``, e.g. Tune's pick; else the best
    seed-mean validation accuracy): accuracy with intervals, queries to the target."""
    best: dict[str, list[dict]] = {}
    for cell in chosen:
        mine = [r for r in runs if r["cell"] == cell.label]
        by_lr: dict[float, list[dict]] = {}
        for run in mine:
            by_lr.setdefault(run["lr"], []).append(run)
        if selection and cell.label in selection:
            lr = selection[cell.label]["lr"]
        else:
            lr = best_step_size({x: [r["val_accuracy"] for r in g] for x, g in by_lr.items()})
        best[cell.label] = sorted(by_lr[lr], key=lambda r: r["seed"])
    finals = {k: np.array([r["test_accuracy"] for r in g]) for k, g in best.items()}
    uniform = [c.label for c in chosen if c.forward_only and c.allocator == "uniform"]
    reference = max(uniform, key=lambda k: finals[k].mean())
    curves = {
        k: np.array([r["curve"]["test_accuracy"] for r in g])
        for k, g in best.items()
        if "curve" in g[0]
    }
    queries = np.asarray(best[reference][0]["curve"]["queries"], dtype=float)
    table = []
    for cell in chosen:
        label = cell.label
        group = best[label]
        row = {
            "method": label,
            "estimator": cell.estimator,
            "allocator": cell.allocator,
            "q": cell.q,
            "lr": group[0]["lr"],
            "steps": group[0]["steps"],
            "queries": group[0]["queries"],
            "seeds": len(group),
            "val_mean": float(np.mean([r["val_accuracy"] for r in group])),
            "test_mean": float(finals[label].mean()),
            "test_ci95": _t_half_width(finals[label]),
            "test_se_binomial": float(
                np.sqrt(finals[label].mean() * (1 - finals[label].mean()) / sizes["test"])
            ),
            "reference": reference,
            "target": float(finals[reference].mean()),
        }
        if label in curves:
            point, own, interval, reached = ratio_with_interval(
                curves[label], curves[reference], finals[reference], queries
            )
            gains = np.array([r["curve"]["gain_star"] for r in group])
            spread = np.array([r["curve"]["alloc_cv"] for r in group])
            ratio_mm = np.array([r["curve"]["alloc_max_over_min"] for r in group])
            row.update(
                queries_to_target=point,
                reference_queries_to_target=own,
                ratio=point / own,
                ratio_ci95=interval,
                ratio_reached_fraction=reached,
                gain_star_curve=np.nanmean(gains, axis=0).tolist(),
                gain_star_final=float(np.nanmean(gains[:, -1])),
                alloc_cv_curve=spread.mean(0).tolist(),
                alloc_max_over_min_curve=ratio_mm.mean(0).tolist(),
                curve_queries=queries.tolist(),
                curve_test_mean=curves[label].mean(0).tolist(),
            )
        table.append(row)
    return table


def format_table(report: dict) -> str:
    p = report["protocol"]
    lines = [
        f"few-shot: k={p['k']} per class, classes {p['target_classes']} (backbone pretrained on "
        f"{p['source_classes']}), {p['seeds']} seeds, {p['total_queries']} queries per run, "
        f"splits {p['split_sizes']}",
        f"{'method':<34} {'lr':>7} {'steps':>5} {'test acc ± 95% CI':>18} "
        f"{'q→target':>9} {'ratio [95% CI]':>20} {'G*':>5} {'cv':>5}",
    ]
    for row in report["table"]:
        cell = (
            f"{row['method']:<34} {row['lr']:>7.4g} {row['steps']:>5} "
            f"{row['test_mean']:>10.3f} ± {row['test_ci95']:.3f}"
        )
        if "ratio" in row:
            lo, hi = row["ratio_ci95"]
            cell += (
                f" {row['queries_to_target']:>9.0f} {row['ratio']:>6.2f} [{lo:>5.2f}, {hi:>5.2f}]"
                f" {row['gain_star_final']:>5.2f} {np.mean(row['alloc_cv_curve']):>5.2f}"
            )
        lines.append(cell)
    first = report["table"][0]
    lines.append(
        f"target {first['target']:.3f} = final mean test accuracy of {first['reference']}; "
        "ratio = queries to reach it / the reference's own (paired bootstrap over seeds)"
    )
    lines.append("at a shared step size, against lr/uniform at that step size:")
    for row in report.get("shared_lr", []):
        lo, hi = row["ratio_ci95"]
        lines.append(
            f"  lr={row['lr']:<7.4g} {row['method']:<26} final {row['test_mean']:.3f} vs "
            f"{row['target']:.3f}  ratio {row['ratio']:>5.2f} [{lo:>5.2f}, {hi:>5.2f}]"
        )
    if report["weighting"]:
        lines.append(
            "count weighting against the unbiased estimator, same allocator and step size:"
        )
    for row in report["weighting"]:
        lines.append(
            f"  lr={row['lr']:<7.4g} {row['method']:<34} final {row['test_mean']:.3f} vs "
            f"{row['unbiased_test_mean']:.3f}  diff {row['diff_mean']:+.3f} ± {row['diff_ci95']:.3f}"
        )
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    acc, gain, spread = axes
    for row in report["table"]:
        if "curve_queries" not in row:
            acc.axhline(row["test_mean"], color="k", lw=1, label=f"{row['method']} (final)")
            continue
        q = np.asarray(row["curve_queries"])
        style = "-" if row["allocator"] == "uniform" else "--"
        acc.plot(q, row["curve_test_mean"], style, marker="o", ms=2.5, label=row["method"])
        gain.plot(q, row["gain_star_curve"], style, label=row["method"])
        spread.plot(q, row["alloc_cv_curve"], style, label=row["method"])
    acc.axhline(report["table"][0]["target"], color="grey", ls=":", lw=1, label="target")
    p = report["protocol"]
    acc.set(
        title=f"{p['k']}-shot, seed mean of {p['seeds']}, each at its best lr",
        xlabel="queries consumed (backprop: forward equivalents)",
        ylabel="test accuracy",
    )
    gain.set(title="G* = mean v / (mean √v)² over the k-shot set", xlabel="queries consumed")
    spread.set(title="allocation spread: std/mean of counts", xlabel="queries consumed")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="jobs/configs/fewshot_digits.yaml")
    parser.add_argument("--k", type=int, default=16, help="training examples per class")
    parser.add_argument("--seeds", type=int, default=8, help="k-shot draws (and head inits)")
    parser.add_argument("--lrs", default="0.0003,0.001,0.003,0.01", help="step-size grid")
    parser.add_argument(
        "--select",
        choices=sorted(SELECTION),
        default="tune",
        help="step-size selection: a Ray Tune grid search per cell (default) or a plain loop",
    )
    parser.add_argument("--total-queries", type=int, default=40_000, help="per run (rounded up)")
    parser.add_argument("--estimators", default="backprop,spsa,lr", help="cells to run")
    parser.add_argument("--mezo-q", type=int, default=2, help="spsa queries per datapoint")
    parser.add_argument("--hidden", type=int, default=0, help="head hidden width (0: linear)")
    parser.add_argument("--feature-block", type=int, default=1, help="backbone block to read")
    parser.add_argument("--pretrain-epochs", type=int, default=80)
    parser.add_argument("--data-dir", default=None, help="override data.dir")
    parser.add_argument(
        "--cache-dir", default=None, help="pretrained backbones (default RUNS/cache)"
    )
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--runs", default="runs/bench", help="scratch directory")
    parser.add_argument("--quick", action="store_true", help="tiny settings for tests")
    parser.add_argument("--cells", default=None, help="comma-separated cell labels: run only these")
    parser.add_argument(
        "--add-cells",
        default=None,
        help="comma-separated cell labels: run only these under OUT/fewshot.json's protocol "
        "and merge them into it",
    )
    parser.add_argument(
        "--resummarise", action="store_true", help="rebuild tables and plot from OUT/fewshot.json"
    )
