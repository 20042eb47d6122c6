"""What a person sees on the terminal: one line per stage, progress for long ones, and
nothing from third-party libraries unless asked for (``--verbose``).

Everything goes through the ``tailor`` logger, so a program embedding the library decides
where it ends up; :func:`setup_console` is what the command line does.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import tqdm.std

LOGGER = logging.getLogger("tailor")

# Loggers of the libraries a run drives; quiet mode lets only their errors through.
# Prefect is quietened at its terminal handler instead (see setup_console).
_THIRD_PARTY_LOGGERS = (
    "lm-eval",
    "lm_eval",
    "transformers",
    "datasets",
    "mlflow",
    "httpx",
    "alembic",
    "urllib3",
    "filelock",
    "torch",
    "accelerate",
    "evaluate",
    "huggingface_hub",
)


def setup_console(verbose: bool) -> None:
    """Stage lines on stderr; with ``verbose=False`` third-party logs below ERROR, their warnings
    and progress bars are hidden. Call before Prefect, lm-eval or transformers are imported:
    some of them read their settings from the environment once, at import."""
    if not any(getattr(h, "_tailor_console", False) for h in LOGGER.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", datefmt="%H:%M:%S"))
        handler._tailor_console = True  # type: ignore[attr-defined]
        LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    global _QUIET
    _QUIET = not verbose
    if verbose:
        return
    # Prefect's terminal handler, not its loggers: below ERROR its lines still reach its API,
    # so the UI shows a run's logs while the terminal stays quiet.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "ERROR")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore")
    _silence_progress_bars()
    import mlflow  # noqa: F401  (it sets its logger's level when imported: import first, then quieten)

    for name in _THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    _quiet_prefect_terminal()
    # A library imported before this call has read its environment settings already.
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def _quiet_prefect_terminal() -> None:
    """Prefect configured its logging already (imported before setup_console): its terminal
    handler to ERROR, found by class name since the library does not import Prefect."""
    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler":
            handler.setLevel(logging.ERROR)


_QUIET = False  # set by setup_console
# stdout is one per process and evaluations run in threads side by side: the first of
# overlapping third_party_prints() blocks swaps it out and the last one puts it back.
_PRINTS_LOCK = threading.Lock()
_PRINTS_STATE: dict = {"depth": 0, "saved": None}


@contextlib.contextmanager
def third_party_prints():
    """Around a library call that prints to stdout (lm-eval's "bootstrapping for stddev"):
    swallows its output in quiet mode, passes it through otherwise. While it runs, other
    threads' prints are swallowed too; the console's own lines go to stderr."""
    if not _QUIET:
        yield
        return
    with _PRINTS_LOCK:
        if _PRINTS_STATE["depth"] == 0:
            _PRINTS_STATE["saved"], sys.stdout = sys.stdout, io.StringIO()
        _PRINTS_STATE["depth"] += 1
    try:
        yield
    finally:
        with _PRINTS_LOCK:
            _PRINTS_STATE["depth"] -= 1
            if _PRINTS_STATE["depth"] == 0:
                sys.stdout = _PRINTS_STATE["saved"]


class OwnBar(tqdm.std.tqdm):
    """llm-tailor's own progress bars (``tailor eval``): shown in quiet mode too."""


def _silence_progress_bars() -> None:
    """Every tqdm bar off at construction, except :class:`OwnBar`. TQDM_DISABLE is not enough:
    lm-eval passes ``disable=`` explicitly, and an explicit argument wins over the environment."""
    original = tqdm.std.tqdm.__init__
    if getattr(original, "_tailor_quiet", False):
        return

    def quiet_init(self, *args, **kwargs):
        if not isinstance(self, OwnBar):
            kwargs["disable"] = True
        original(self, *args, **kwargs)

    quiet_init._tailor_quiet = True  # type: ignore[attr-defined]
    tqdm.std.tqdm.__init__ = quiet_init


def format_seconds(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class Stage:
    """A stage under way in a :meth:`Stages.stage` block; ``detail`` is its end line's summary."""

    name: str
    detail: str = ""


class Stages:
    """Numbered start and end lines for a run's stages (``[3/11] evaluate-pruned ...``);
    ``current`` names the stage under way, for error reports."""

    def __init__(self, names: list[str]):
        self.names = names
        self.current = names[0] if names else ""
        self._started: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[Stage]:
        """The start line now and the end line, with the ``detail`` set in the block, after it.
        A block that raises prints no end line and leaves ``current`` naming the stage: the
        failure is reported by whoever catches it (the flow's failure hooks)."""
        stage = Stage(name)
        self.start(name)
        yield stage
        self.done(name, stage.detail)

    def start(self, name: str) -> None:
        self.current = name
        self._started[name] = time.perf_counter()
        LOGGER.info(f"{self._position(name)} {name} ...")

    def done(self, name: str, summary: str = "") -> None:
        took = format_seconds(time.perf_counter() - self._started.get(name, time.perf_counter()))
        LOGGER.info(f"{self._position(name)} {name} done in {took}" + (f": {summary}" if summary else ""))

    def _position(self, name: str) -> str:
        k = self.names.index(name) + 1 if name in self.names else "?"
        return f"[{k}/{len(self.names)}]"


class Progress:
    """Progress of a long loop as occasional log lines: at most one per ``every_pct`` percent
    and never more often than ``min_seconds`` (a terminal, a log file and a CI log all read it)."""

    def __init__(self, label: str, total: int, unit: str, every_pct: int = 10, min_seconds: float = 20.0):
        self.label, self.total, self.unit = label, max(total, 1), unit
        self.every_pct, self.min_seconds = every_pct, min_seconds
        self._start = self._last_time = time.perf_counter()
        self._last_pct = 0

    def update(self, done: int, extra: str = "") -> None:
        pct = 100 * done // self.total
        now = time.perf_counter()
        # The end of the loop is the stage's own "done" line.
        if done >= self.total or pct < self._last_pct + self.every_pct or now - self._last_time < self.min_seconds:
            return
        self._last_pct, self._last_time = pct, now
        elapsed = now - self._start
        eta = "" if done == 0 else f", about {format_seconds(elapsed * (self.total - done) / done)} left"
        LOGGER.info(
            f"      {self.label}: {pct}% ({done:,}/{self.total:,} {self.unit}{eta})" + (f" {extra}" if extra else "")
        )
