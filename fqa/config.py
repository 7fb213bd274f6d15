"""Typed, range-checked run configuration (YAML maps 1:1 onto these models).

pydantic does the type and range checks; ``load_config`` turns its errors into one
message that names each bad field, its value and the fix, before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _storage_field(*names: str):
    """A validator for fields holding a local path or a storage URI (fqa.storage)."""

    def check(cls, value):
        from fqa.storage import check_location

        return value if value is None else check_location(value)

    return field_validator(*names)(classmethod(check))


class RunConfig(_Section):
    name: str = "run"  # run directory name under out_dir; reusing it resumes the run
    # where run directories (metrics, checkpoints, plots) go: a path, s3://… or gs://…
    out_dir: str = "runs"
    seed: int = Field(0, ge=0)  # every random draw (batches, noise, allocator) derives from it
    resume: bool = True  # continue from the run directory's latest checkpoint if present
    # auto: this worker's GPU when one is visible (Ray assigns it), else the CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16: autocast forward passes; fp32 master weights, perturbations and optimizer steps
    precision: Literal["fp32", "bf16"] = "fp32"
    # keep freed host memory in the process (glibc): no page faults for each query's
    # tensors, at the cost of holding the peak (fqa.host_memory)
    retain_host_memory: bool = True

    _out_dir = _storage_field("out_dir")


class DataConfig(_Section):
    dataset: Literal["digits", "parquet"] = "digits"  # digits: prepared on demand
    dir: str = "data/digits"  # holds train/validation/test.parquet: a path, s3://… or gs://…
    classes: list[int] | None = None  # keep only these labels (None: all)
    # a split whose decoded images exceed this many MB is opened lazily (fqa.lazy_data):
    # rows are read on demand through a row-group cache of cache_mb
    in_memory_mb: float = Field(1024.0, ge=0)
    cache_mb: float = Field(256.0, gt=0)  # lazy splits: bytes of decoded row groups kept

    _dir = _storage_field("dir")


class ModelConfig(_Section):
    name: str = "vit_tiny_patch16_224"  # any timm model name
    # timm constructor overrides; the default shrinks the ViT to 16x16 single-channel digits
    kwargs: dict[str, Any] = Field(
        default_factory=lambda: {
            "img_size": 16,
            "patch_size": 4,
            "in_chans": 1,
            "embed_dim": 64,
            "depth": 4,
            "num_heads": 4,
        }
    )
    input_size: int = Field(16, ge=1)  # images are resized to input_size x input_size
    pretrained: bool | str = False  # timm hub weights (needs network); prefer `checkpoint`
    checkpoint: str | None = None  # .safetensors state dict to start from (path or URI)
    reset_head: bool = True  # drop checkpoint head weights whose shape differs (new classes)

    _checkpoint = _storage_field("checkpoint")


class TrainableConfig(_Section):
    # full: every parameter; head: classifier only; last_blocks: the last `blocks`
    # transformer blocks + final norm + head; lora: low-rank adapters on the attention
    # and MLP Linear layers of every block, plus the head.
    mode: Literal["full", "head", "last_blocks", "lora"] = "last_blocks"
    blocks: int = Field(1, ge=1)  # last_blocks: blocks trained; lora: see lora_all_blocks
    lora_rank: int = Field(4, ge=1)  # for lora
    lora_alpha: float = Field(8.0, gt=0)  # lora scale = alpha / rank
    lora_all_blocks: bool = True  # lora: adapt every block (False: only the last `blocks`)
    lora_fixed_up: bool = False  # lora: B fixed random, only A trains (noise at rank r only)


class EstimatorConfig(_Section):
    name: str = "lr"  # spsa | lr (see fqa.estimators.list_estimators())
    epsilon: float = Field(1e-3, gt=0)  # spsa: weight perturbation scale
    sigma: float = Field(0.1, gt=0)  # lr: std of the noise added to layer outputs
    antithetic: bool = True  # lr: queries in (+noise, -noise) pairs
    hook_conv: bool = False  # lr: also inject noise into trainable Conv2d outputs
    two_pass: bool = False  # lr: a second accumulating forward instead of storing inputs
    # lr: recompute each MLP's hidden activation from its input instead of storing it
    # (about half the memory for one more matmul per MLP; no effect with two_pass)
    recompute_hidden: bool = True
    # lr: where ε comes from: auto (a counter-based C kernel on the CPU, torch.randn on
    # GPUs), torch (torch.randn everywhere: the values of releases before the kernel)
    noise_source: Literal["auto", "torch"] = "auto"
    # lr: the per-sample score norm the allocators read, from this many random probes per
    # layer where a layer sees >= 2x as many tokens (unbiased, cheaper); 0: always exact
    score_probes: int = Field(16, ge=0)
    # unbiased: 1/(B·n_i) per sample; count: 1/N per sample (the FLOPS code's biased mean)
    weighting: Literal["unbiased", "count"] = "unbiased"
    shard_rows: int = Field(512, ge=1)  # samples per shard (the unit a worker evaluates)


class AllocatorConfig(_Section):
    name: str = "uniform"  # uniform | neyman | gaussian | bernoulli (| oracle: benchmarks)
    n_min: int = Field(1, ge=1)  # floor of samples per datapoint
    kwargs: dict[str, Any] = Field(default_factory=dict)  # allocator constructor arguments
    stats_decay: float = Field(1.0, gt=0, le=1)  # per-visit forgetting of variance statistics


class TrainConfig(_Section):
    steps: int = Field(300, ge=1)  # optimizer steps
    batch_size: int = Field(64, ge=1)  # datapoints per step (B)
    queries_per_datapoint: int = Field(8, ge=1)  # perturbed queries per datapoint on average
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)  # step size
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # step size decay to 0
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd only
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)  # clip the estimated gradient's norm
    eval_every: int = Field(50, ge=1)  # steps between validation evaluations
    checkpoint_every: int = Field(100, ge=1)  # steps between checkpoints
    max_nonfinite_steps: int = Field(5, ge=1)  # consecutive skipped steps before stopping
    progress: bool = True  # a tqdm bar on a terminal, else plain lines (fqa.progress)
    log_every: int = Field(25, ge=1)  # steps between plain progress lines off a terminal


class PretrainConfig(_Section):
    # Backpropagation pretraining on a disjoint source task, cached, stands in for the
    # hub weights this machine cannot download.
    enabled: bool = False
    classes: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    epochs: int = Field(30, ge=1)
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    cache_dir: str = "runs/cache"  # a path, s3://… or gs://…

    _cache_dir = _storage_field("cache_dir")


class CompareConfig(_Section):
    backprop: bool = False  # also fine-tune the same parameters with backpropagation
    backprop_steps: int | None = Field(None, ge=1)  # default: train.steps
    allocators: list[str] = Field(default_factory=list)  # extra forward runs, same budget


class TaskConfig(_Section):
    # what is learned; the CLIP tasks read model.name as an open_clip model
    name: str = "image_classification"  # see fqa.tasks.list_tasks()
    # CLIP: training captions written from class names by these templates, one chosen by
    # the image's index (None: the Parquet caption column)
    caption_templates: list[str] | None = None
    # CLIP: zero-shot class prompts, text features averaged over the templates
    prompt_templates: list[str] = Field(default_factory=lambda: ["a photo of the digit {}"])
    contrast_size: int = Field(16, ge=2)  # clip_align: pairs per InfoNCE contrast group
    align_rank: int | None = Field(None, ge=1)  # clip_align: low-rank adapter heads (None: full)
    ctx_init: str | None = "a photo of the digit"  # clip_prompt: context words (None: random)
    n_ctx: int = Field(4, ge=1)  # clip_prompt: context tokens when ctx_init is None
    class_specific: bool = False  # clip_prompt: one context per class (CoOp's CSC)
    cache_features: bool = True  # clip_prompt: image features computed once per image
    # backbone_features (a head over a frozen backbone; trainable.* is not read): the
    # backbone block whose tokens the head reads (0 = first)
    feature_block: int = Field(1, ge=0)
    head_hidden: int = Field(0, ge=0)  # backbone_features: head hidden width (0: one Linear)


class ClusterConfig(_Section):
    # used only by cluster/ (the Ray layer); the single-process trainer ignores it
    num_workers: int = Field(2, ge=1)  # QueryWorker actors (one per GPU on a GPU cluster)
    cpus_per_worker: float = Field(1.0, gt=0)  # CPU share reserved by each worker
    gpus_per_worker: float = Field(0.0, ge=0)  # GPUs reserved by each worker (1: one per GPU)
    checksum_every: int = Field(10, ge=1)  # steps between replica checksum comparisons
    # seconds a worker may take for one shard, pre-pass or update before it is deemed hung,
    # restarted, and its work re-dispatched (generous: a slow step must not look hung)
    shard_timeout_s: float = Field(300.0, gt=0)


class Config(_Section):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    trainable: TrainableConfig = TrainableConfig()
    estimator: EstimatorConfig = EstimatorConfig()
    allocator: AllocatorConfig = AllocatorConfig()
    train: TrainConfig = TrainConfig()
    pretrain: PretrainConfig = PretrainConfig()
    compare: CompareConfig = CompareConfig()
    cluster: ClusterConfig = ClusterConfig()
    task: TaskConfig = TaskConfig()

    @field_validator("estimator", mode="after")
    @classmethod
    def _known_estimator(cls, value: EstimatorConfig) -> EstimatorConfig:
        from fqa.estimators import ESTIMATORS

        ESTIMATORS.check(value.name)
        return value

    @field_validator("task", mode="after")
    @classmethod
    def _known_task(cls, value: TaskConfig) -> TaskConfig:
        from fqa.tasks import TASKS

        TASKS.check(value.name)
        return value

    @field_validator("allocator", mode="after")
    @classmethod
    def _known_allocator(cls, value: AllocatorConfig) -> AllocatorConfig:
        from fqa.allocators import ALLOCATORS

        ALLOCATORS.check(value.name)
        return value

    @field_validator("compare", mode="after")
    @classmethod
    def _known_compared(cls, value: CompareConfig) -> CompareConfig:
        from fqa.allocators import ALLOCATORS

        for name in value.allocators:
            ALLOCATORS.check(name)
        return value

    @model_validator(mode="after")
    def _budget_fits(self) -> Config:
        per_sample = queries_per_sample(self.estimator)
        q = self.train.queries_per_datapoint
        if q % per_sample:
            raise ValueError(
                f"train.queries_per_datapoint={q} is not a multiple of {per_sample}, the "
                f"queries in one {self.estimator.name} sample; use {q + per_sample - q % per_sample}"
            )
        if q // per_sample < self.allocator.n_min:
            raise ValueError(
                f"budget of {q} queries per datapoint ({q // per_sample} samples) is below "
                f"allocator.n_min={self.allocator.n_min}; raise queries_per_datapoint to "
                f"{self.allocator.n_min * per_sample} or lower n_min"
            )
        return self

    def sample_budget(self) -> int:
        """Samples to split over one batch (the allocator's N)."""
        per_sample = queries_per_sample(self.estimator)
        return self.train.batch_size * self.train.queries_per_datapoint // per_sample

    def fingerprint(self, fields: tuple[str, ...] | None = None) -> str:
        """A short hash of the config, or of only the named (dotted) sections/fields."""
        data = self.model_dump(mode="json")
        if fields is not None:
            picked = {}
            for dotted in fields:
                node = data
                for part in dotted.split("."):
                    node = node[part]
                picked[dotted] = node
            data = picked
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def queries_per_sample(estimator: EstimatorConfig) -> int:
    """Queries one allocated sample costs (a central difference or antithetic pair is 2):
    the estimator's own answer, so no name switch here."""
    from fqa.estimators import create_estimator

    return create_estimator(**estimator.model_dump()).queries_per_sample


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key; remove it or fix its spelling (see fqa/config.py)"
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}{shown}"


def parse_config(data: dict[str, Any] | None) -> Config:
    try:
        return Config.model_validate(data or {})
    except ValidationError as exc:
        lines = [_describe(error) for error in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    data = read_yaml_mapping(path, "config file", "see jobs/configs/ for examples")
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return parse_config(data)


def read_yaml_mapping(path: str | Path, what: str, hint: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (safe_load: tags never build objects)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; {hint}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping, got {type(data).__name__}")
    return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.lr=0.01", ...]`` -> ``{"train.lr": 0.01}``; values are YAML scalars, never code."""
    parsed = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. train.lr=0.01), got {pair!r}")
        key, value = pair.split("=", 1)
        parsed[key] = yaml.safe_load(value)
    return parsed


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data['a']['b'] = value`` for ``dotted='a.b'`` (command-line overrides)."""
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[leaf] = value


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    data = config.model_dump(mode="json")
    for dotted, value in overrides.items():
        set_dotted(data, dotted, value)
    return parse_config(data)
