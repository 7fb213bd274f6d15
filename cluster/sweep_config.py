"""The sweep YAML: a base ``jobs.train`` config plus a search space over its dotted keys.

Everything here is checked before any trial starts (``load_sweep``): the YAML's shape,
every search-space key and value (each one is applied to the base config, so an unknown
or out-of-range parameter fails with the config's own message), and the metric. The
resource check needs the cluster and lives in ``cluster.tune``. Checking a ``val_*`` metric
builds the task once (untrained) to learn the names its evaluation reports.

    base: vit_digits.yaml            # a jobs.train YAML, relative to this file
    config: {train: {progress: false}}   # inline config / overrides on the base
    space:
      allocator.name: {grid: [uniform, gaussian]}
      train.lr: {loguniform: [0.003, 0.03]}
    total_queries: 115200            # per trial; derives train.steps from the budget
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fqa.config import (
    Config,
    ConfigError,
    parse_config,
    read_yaml_mapping,
    set_dotted,
    with_overrides,
)

# what every trial reports to Tune at each evaluation (cluster.driver -> Trainer metrics),
# besides val_<name> for each metric of the task's evaluate(); the sweep's metric must be
# one of them. tests/test_sweep.py checks that the reports hold them.
STEP_METRICS = ("loss", "accuracy", "queries", "step")
_MAX_CHECKED_COMBINATIONS = 4096  # beyond this, values are checked one key at a time


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamSpec(_Strict):
    """Exactly one of: ``grid`` (every value, crossed with the other grids), ``choice``
    (one value drawn per sample), ``loguniform`` / ``uniform`` ([low, high])."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        given = [
            k for k in ("grid", "choice", "loguniform", "uniform") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of grid, choice, loguniform, uniform (got {given or 'none'})"
            )
        kind = given[0]
        if kind in ("grid", "choice") and not getattr(self, kind):
            raise ValueError(f"{kind} is empty; list at least one value")
        if kind in ("loguniform", "uniform"):
            low, high = getattr(self, kind)
            if not low < high or (kind == "loguniform" and low <= 0):
                raise ValueError(
                    f"{kind} needs 0 < low < high (uniform: low < high), got [{low}, {high}]"
                )
        return self

    @property
    def kind(self) -> str:
        return next(
            k for k in ("grid", "choice", "loguniform", "uniform") if getattr(self, k) is not None
        )

    def probe_values(self) -> list[Any]:
        """Values that stand for the whole range when validating against the config."""
        return list(getattr(self, self.kind))


class SchedulerSpec(_Strict):
    # asha: trials are compared and stopped at equal *queries consumed*, not equal steps
    name: Literal["asha", "none"] = "asha"
    grace_queries: int | None = Field(None, ge=1)  # default: total queries / 8
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(_Strict):
    name: str = "sweep"  # the Tune experiment name; outputs go to storage/name
    base: str | None = None  # a jobs.train YAML (relative to the sweep file)
    config: dict[str, Any] = Field(default_factory=dict)  # inline config, merged onto base
    space: dict[str, ParamSpec]
    total_queries: int | None = Field(None, ge=1)  # per trial; derives train.steps
    evals_per_trial: int = Field(10, ge=1)  # with total_queries: evaluations per trial
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSpec = SchedulerSpec()
    num_samples: int = Field(1, ge=1)  # repeats of the grid (random keys redrawn each time)
    max_concurrent_trials: int | None = Field(None, ge=1)  # default: what the cluster holds
    max_failures: int = Field(1, ge=0)  # retries of a crashed trial, from its checkpoint
    storage: str = "runs/sweeps"  # the sweep directory is storage/name
    time_budget_s: float | None = Field(None, gt=0)  # stop starting/running trials after this
    driver_cpus: float = Field(0.0, ge=0)  # the trial's driver bundle (0: workers only)
    crash_at_step: int | None = Field(None, ge=0)  # test-only: each trial raises once there

    @model_validator(mode="after")
    def _space_and_metric(self) -> SweepConfig:
        if not self.space:
            raise ValueError("space is empty; add at least one dotted config key, e.g. train.lr")
        if self.metric not in STEP_METRICS and not self.metric.startswith("val_"):
            raise ValueError(
                f"metric {self.metric!r} is never reported by a trial; use val_<an evaluation "
                f"metric of the task> (e.g. val_accuracy) or one of {', '.join(STEP_METRICS)}"
            )
        return self


@functools.lru_cache(maxsize=8)
def _evaluation_metrics(config_json: str) -> tuple[str, ...]:
    """The names the task's ``evaluate`` returns (trials report them as val_<name>): the
    task is built once, untrained, and evaluated on the validation split."""
    from fqa.setup import build_task

    config = Config.model_validate_json(config_json)
    if config.pretrain.enabled and not config.model.checkpoint:
        config = with_overrides(config, {"pretrain.enabled": False})  # names only: no weights
    return tuple(sorted(build_task(config).evaluate("validation")))


def reported_metrics(base: Config) -> tuple[str, ...]:
    """Every metric a trial of this config reports at each evaluation."""
    return (*STEP_METRICS, *(f"val_{name}" for name in _evaluation_metrics(base.model_dump_json())))


def check_metric(sweep: SweepConfig, base: Config) -> None:
    if sweep.metric in STEP_METRICS:
        return
    reported = reported_metrics(base)
    if sweep.metric not in reported:
        raise ConfigError(
            f"metric {sweep.metric!r} is never reported by a trial of this task; use one of "
            f"{', '.join(reported)}"
        )


def steps_for_budget(config: Config, total_queries: int) -> int:
    """Steps that spend ``total_queries`` (pre-pass included: B(q+1) queries per step)."""
    per_step = config.train.batch_size * (config.train.queries_per_datapoint + 1)
    return max(1, round(total_queries / per_step))


def trial_config(base: Config, sweep: SweepConfig, params: dict[str, Any]) -> Config:
    """The jobs.train config of one trial: the base with the sampled values, and — with
    ``total_queries`` — the steps (and eval/checkpoint cadence) that budget buys."""
    config = with_overrides(base, params)
    if sweep.total_queries is None:
        return config
    steps = steps_for_budget(config, sweep.total_queries)
    every = max(1, steps // sweep.evals_per_trial)
    checkpoint = every * max(1, sweep.evals_per_trial // 4)  # a multiple of eval_every
    return with_overrides(
        config,
        {"train.steps": steps, "train.eval_every": every, "train.checkpoint_every": checkpoint},
    )


def _base_data(sweep: SweepConfig, folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if sweep.base is not None:
        path = (folder / sweep.base) if not Path(sweep.base).is_absolute() else Path(sweep.base)
        data = read_yaml_mapping(path, f"sweep base {sweep.base!r}:", "give a jobs.train YAML")
    _merge(data, sweep.config)
    return data


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if (
            isinstance(value, dict)
            and isinstance(into.get(key), dict)
            and not key.endswith("kwargs")
        ):
            _merge(into[key], value)
        else:
            into[key] = value


def check_space(base: Config, sweep: SweepConfig) -> None:
    """Apply every value (ranges: both ends) to the base config; the config's own checks
    name what is wrong. Value combinations are checked too while their number is small."""
    for key, spec in sweep.space.items():
        for value in spec.probe_values():
            try:
                trial_config(base, sweep, {key: value})
            except ConfigError as exc:
                raise ConfigError(
                    f"sweep space parameter {key}={value!r} does not make a valid config: {exc}"
                ) from None
    keys = list(sweep.space)
    combos = list(itertools.islice(
        itertools.product(*(sweep.space[k].probe_values() for k in keys)),
        _MAX_CHECKED_COMBINATIONS + 1,
    ))  # fmt: skip
    if len(combos) > _MAX_CHECKED_COMBINATIONS:
        return
    for values in combos:
        params = dict(zip(keys, values, strict=True))
        try:
            trial_config(base, sweep, params)
        except ConfigError as exc:
            raise ConfigError(
                f"sweep space combination {params} is not a valid config: {exc}"
            ) from None


def load_sweep(
    path: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[SweepConfig, Config]:
    """Parse and check the sweep YAML; ``overrides`` (dotted, ``--set``) apply to the sweep
    keys (``num_samples=2``) or, with a ``config.`` prefix, to the trial config."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep config", "see jobs/configs/sweep_*.yaml")
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return parse_sweep(raw, path.parent)


def parse_sweep(raw: dict[str, Any], folder: Path = Path(".")) -> tuple[SweepConfig, Config]:
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "sweep"
            if error["type"] == "extra_forbidden":
                lines.append(f"{where}: unknown sweep key; see cluster/sweep_config.py")
            else:
                lines.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
        raise ConfigError("invalid sweep config:\n  " + "\n  ".join(lines)) from None
    base = parse_config(_base_data(sweep, folder))
    check_space(base, sweep)
    check_metric(sweep, base)
    return sweep, base
