"""Progress off a terminal is a plain line every ``every`` steps, never bar redraws."""

import io

import pytest

from fqa.progress import Progress, progress


def test_off_a_terminal_one_line_every_n_steps_and_at_the_end():
    stream = io.StringIO()
    with Progress(60, "run", every=25, tty=False, stream=stream) as bar:
        for _ in range(60):
            bar.update(1, loss="0.5")
    lines = stream.getvalue().splitlines()
    assert [line.split(" loss")[0] for line in lines] == ["run: 25/60", "run: 50/60", "run: 60/60"]
    assert "\r" not in stream.getvalue()


def test_resumed_runs_count_from_their_step():
    stream = io.StringIO()
    with Progress(10, "run", every=5, initial=7, tty=False, stream=stream) as bar:
        for _ in range(3):
            bar.update(1)
    assert [line.split(" (")[0] for line in stream.getvalue().splitlines()] == ["run: 10/10"]


def test_disabled_progress_prints_nothing_and_a_terminal_gets_a_bar():
    quiet = io.StringIO()
    assert list(progress(range(30), 30, "x", enabled=False, every=1, stream=quiet)) == list(range(30))
    assert quiet.getvalue() == ""
    terminal = io.StringIO()
    with Progress(3, "bar", tty=True, stream=terminal) as bar:
        assert bar.bar is not None
        bar.update(3)
    assert "3/3" in terminal.getvalue()


def test_a_bad_interval_is_refused_with_the_field_to_fix():
    with pytest.raises(ValueError, match="train.log_every"):
        Progress(10, "run", every=0)
