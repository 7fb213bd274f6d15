"""Progress of a loop: a tqdm bar on a terminal, plain lines anywhere else.

Under ``ray job submit``, CI or a redirected stdout a bar's carriage-return redraws
become thousands of log lines; there one line every ``every`` steps (and at the end)
says the same.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm


class Progress:
    def __init__(
        self,
        total: int,
        desc: str,
        *,
        enabled: bool = True,
        every: int = 25,
        initial: int = 0,
        tty: bool | None = None,
        stream: TextIO | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"progress: every={every} must be at least 1 (train.log_every)")
        self.total, self.desc, self.every = total, desc, every
        self.done = initial
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        tty = sys.stdout.isatty() if tty is None else tty
        self.bar = (
            tqdm(total=total, initial=initial, desc=desc, file=self.stream)
            if enabled and tty
            else None
        )

    def update(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if fields:
                self.bar.set_postfix(fields)
            return
        if self.done % self.every == 0 or self.done >= self.total:
            elapsed = time.perf_counter() - self.started
            extra = "".join(f" {k}={v}" for k, v in fields.items())
            print(
                f"{self.desc}: {self.done}/{self.total}{extra} ({elapsed:.0f} s)",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable, total: int, desc: str, **kwargs):
    """Iterate with progress: ``for x in progress(items, len(items), "desc"): ...``."""
    with Progress(total, desc, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update(1)
