"""A run directory's outputs, local or on object storage (fqa.storage).

Files: ``config.json``, ``metrics.jsonl`` (one line per step), ``summary.json``,
``curves.png`` and ``checkpoints/`` (fqa.checkpoint). Locally they are written in place,
as always. On object storage an object cannot be appended to, so ``metrics.jsonl`` is
kept in a local staging file, appended per step, and uploaded at every checkpoint (before
the checkpoint itself, so a resumed run never lacks the lines of its checkpointed steps)
and at the end. A resume downloads it first; lines past the checkpoint are dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from fqa.plots import plot_run
from fqa.storage import Remote, location, scratch_dir


class RunStorage:
    def __init__(self, run_dir: str | Path | Remote) -> None:
        self.run_dir = location(run_dir)
        self.remote = isinstance(self.run_dir, Remote)
        # where metrics are appended: the run directory itself, or a local staging copy
        self.local = scratch_dir("fqa-run-") if self.remote else self.run_dir
        self._sink: IO[str] | None = None

    @property
    def checkpoint_dir(self) -> Path | Remote:
        return self.run_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        """The local metrics file (the staging copy for a remote run)."""
        return self.local / "metrics.jsonl"

    def check(self) -> None:
        """Fail early and clearly on an unusable store (bucket, credentials, endpoint)."""
        if self.remote:
            self.run_dir.check_bucket()

    def write_json(self, name: str, data: Any) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / name).write_text(json.dumps(data, indent=1))

    def open_metrics(self, step: int) -> IO[str]:
        """The metrics file opened for appending, holding exactly the steps before ``step``."""
        self.local.mkdir(parents=True, exist_ok=True)
        if self.remote:
            remote = self.run_dir / "metrics.jsonl"
            if remote.is_file():
                remote.download(self.metrics_path)
        truncate_metrics(self.metrics_path, step)
        self._sink = open(self.metrics_path, "a")
        return self._sink

    def append(self, metrics: dict[str, Any]) -> None:
        self._sink.write(json.dumps(metrics) + "\n")
        self._sink.flush()

    def sync(self) -> None:
        """Upload the staged metrics (remote runs; a no-op locally)."""
        if self.remote and self.metrics_path.is_file():
            (self.run_dir / "metrics.jsonl").upload(self.metrics_path)

    def close_metrics(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        self.sync()

    def plot(self, title: str) -> None:
        target = self.local / "curves.png"
        plot_run(self.metrics_path, target, title=title)
        if self.remote:
            (self.run_dir / "curves.png").upload(target)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records past the resumed step, so every step index appears exactly once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a killed driver: the step reruns
            continue
        if record["step"] < step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
