"""Progress display, configured once: tqdm bars on a terminal, plain lines at a fixed interval in a log.

On a terminal (stderr a tty) a bar is tqdm's own: redrawn in place, rate and ETA, nested bars by `position`.
Elsewhere (`aml ... > log 2>&1`, a batch job) the same tqdm bar writes through `LogLines`: one newline-terminated
line when it starts, then at most one per `LOG_INTERVAL` seconds (`$AML_PROGRESS_INTERVAL`), then one when it
ends; never a carriage return or a cursor move, so a log holds a line per interval, not a redraw per item.
`terminal_only` bars (the training steps) are not shown in a log at all: the trainer logs one line per epoch.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, TextIO

from tqdm import tqdm

from aml.errors import UserError

LOG_INTERVAL = 30.0  # seconds between two progress lines of one bar outside a terminal
INTERVAL_ENV = "AML_PROGRESS_INTERVAL"
# a log line: "extract: 120/500 img (24%), 00:30 elapsed, 01:35 left, 4.00img/s"
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, {remaining} left, {rate_fmt}"
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # the cursor moves tqdm writes for nested bars


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def log_interval() -> float:
    """Seconds between progress lines in a log: $AML_PROGRESS_INTERVAL, else LOG_INTERVAL."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return LOG_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise UserError(f"{INTERVAL_ENV}={text!r}: not a number of seconds >= 0; set it to e.g. 30, or unset it")
    return value


class LogLines:
    """The file tqdm draws on outside a terminal: each status it draws becomes one newline-terminated line
    (carriage returns turned into line ends, cursor moves and blank clearing dropped)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        for line in _CONTROL.sub("", text).replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def progress_bar(
    total: int,
    desc: str,
    unit: str = "it",
    *,
    enabled: bool = True,
    terminal_only: bool = False,
    initial: int = 0,
    position: int | None = None,
    leave: bool | None = None,
) -> tqdm:
    """A tqdm bar of `total` steps on stderr: a terminal bar, or log lines every `log_interval()` seconds (none
    if `terminal_only`); a disabled bar (all calls no-ops) when not `enabled`. `position` / `leave` place nested
    bars on a terminal (an inner bar: position=1, leave=False). Use `update(k)`, `set_postfix_str`, `close()`."""
    stream = sys.stderr
    terminal = on_terminal(stream)
    if not enabled or (terminal_only and not terminal):
        return tqdm(total=total, disable=True)
    common: dict[str, Any] = {"total": total, "desc": desc, "unit": unit, "initial": initial}
    if terminal:
        return tqdm(**common, file=stream, position=position, leave=leave, dynamic_ncols=True)
    interval = log_interval()
    # miniters=1: every update checks the clock, so a line is written once `interval` has passed (not after an
    # adaptive number of items); tqdm's monitor thread then never redraws it either.
    return tqdm(
        **common,
        file=LogLines(stream),
        mininterval=interval,
        miniters=1,
        bar_format=LOG_FORMAT + "{postfix}",
        leave=True,
    )


def write_line(text: str) -> None:
    """Print a line to stdout without breaking the bars shown on a terminal (tqdm.write)."""
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()
