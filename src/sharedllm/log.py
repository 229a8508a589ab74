"""One channel for messages and progress: the `sharedllm` logger and one progress-bar helper.

Messages: `say(msg)` is `logging.getLogger("sharedllm").info(msg)`. The CLI calls `setup(verbosity)`; a library
user who never calls it still sees INFO messages on stderr as `[sharedllm] msg` (the handler is installed on first
use when the logger has none). To route them elsewhere, add your own handler to the "sharedllm" logger before
the first message (then none is installed), or call `setup(-1)` to keep only warnings.

Progress: `progress(iterable, total=, desc=)` is a tqdm bar with ETA on stderr, shown when stderr is a terminal;
`-q` or `--json` hide it, `-v` shows it even when stderr is not a terminal.
"""
from __future__ import annotations

import contextlib
import logging
import sys

LOGGER = logging.getLogger("sharedllm")
QUIET, NORMAL, VERBOSE = -1, 0, 1
_settings = {"verbosity": NORMAL, "bars": True}


class StderrHandler(logging.Handler):
    """Writes `[sharedllm] msg` to whatever sys.stderr is when the record is emitted (so capture works)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(f"[sharedllm] {record.getMessage()}\n")
            stream.flush()
        except Exception:  # noqa: BLE001  (logging's own convention: never raise from emit)
            self.handleError(record)


def _level(verbosity: int) -> int:
    return logging.WARNING if verbosity <= QUIET else logging.DEBUG if verbosity >= VERBOSE else logging.INFO


def _install_handler() -> None:
    for h in [h for h in LOGGER.handlers if isinstance(h, StderrHandler)]:
        LOGGER.removeHandler(h)
    LOGGER.addHandler(StderrHandler())


def setup(verbosity: int = NORMAL, bars: bool = True) -> None:
    """The CLI's switch: -1 quiet (warnings only, no bars), 0 normal, 1 verbose (debug, bars even off a terminal).
    `bars=False` hides progress bars whatever the verbosity (e.g. under --json)."""
    _settings.update(verbosity=verbosity, bars=bars)
    _install_handler()
    LOGGER.setLevel(_level(verbosity))


@contextlib.contextmanager
def configured(verbosity: int = NORMAL, bars: bool = True):
    """`setup` for the length of a block, then the previous settings again (one CLI call inside a longer process,
    e.g. a test or a bet, leaves the process as it found it)."""
    saved, level, handlers = dict(_settings), LOGGER.level, list(LOGGER.handlers)
    setup(verbosity, bars)
    try:
        yield
    finally:
        _settings.update(saved)
        LOGGER.setLevel(level)
        LOGGER.handlers[:] = handlers


def _ensure_handler() -> None:
    """Library use without `setup`: INFO to stderr, unless someone configured the logger already."""
    if not LOGGER.handlers:
        _install_handler()
        if LOGGER.level == logging.NOTSET:
            LOGGER.setLevel(logging.INFO)


def say(msg: str) -> None:
    """A progress message (INFO): on stderr, so --json output on stdout stays clean."""
    _ensure_handler()
    LOGGER.info(msg)


def debug(msg: str) -> None:
    _ensure_handler()
    LOGGER.debug(msg)


def bars_enabled() -> bool:
    if not _settings["bars"] or _settings["verbosity"] <= QUIET:
        return False
    return _settings["verbosity"] >= VERBOSE or sys.stderr.isatty()


def progress(iterable=None, total: int | None = None, desc: str | None = None, unit: str = "it", **kw):
    """A tqdm bar (ETA included) on the current stderr, or a silent one; use it as tqdm (iterate, or `with ... as
    bar: bar.update(1)`). Bars appear only after a second (at once under -v), so short loops stay quiet."""
    from tqdm.auto import tqdm

    kw.setdefault("leave", False)
    kw.setdefault("delay", 0.0 if _settings["verbosity"] >= VERBOSE else 1.0)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not bars_enabled(), **kw)


def milestone(label: str, step: int, total: int, loss: float) -> None:
    """When no bar is shown, a long loop logs a line every 10 % of its steps (background runs, CI logs)."""
    if not bars_enabled() and total >= 20 and step % (total // 10) == 0:
        say(f"{label}: step {step}/{total} loss {loss:.4f}")


def report(bar, msg: str) -> None:
    """A loop's status: on its bar when one is shown, else as a log line (so bars and log lines never interleave)."""
    if getattr(bar, "disable", True):
        say(msg)
    else:
        bar.set_postfix_str(msg, refresh=True)
