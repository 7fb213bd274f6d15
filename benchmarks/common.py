"""What every benchmark shares: its common arguments and writing ``<name>.json`` + ``<name>.png``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fqa.plots import plt

DEFAULT_CONFIG = "jobs/configs/vit_digits_ten_classes.yaml"
DEFAULT_OUT = "docs/results"


def add_common_arguments(parser, runs: bool = True) -> None:
    """``--config``, ``--out``, ``--quick`` and (for benchmarks that train) ``--runs``."""
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="base YAML config")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where <name>.json and .png go")
    if runs:
        parser.add_argument("--runs", default="runs/bench", help="scratch run directories")
    parser.add_argument("--quick", action="store_true", help="tiny settings for tests")


def write_report(
    out: str | Path, name: str, report: dict[str, Any], plot: Callable[[dict, Any], None]
) -> Path:
    """``out/<name>.json`` and ``out/<name>.png`` (``plot(report, fig_path)``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    plot(report, out / f"{name}.png")
    return out / f"{name}.json"


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
