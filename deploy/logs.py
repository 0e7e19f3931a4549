"""The process's logging, set up in one place: :func:`configure_logging`.

``worker`` (:mod:`deploy.cli`) and ``make demo`` (:mod:`deploy.demo`) call it once, first thing.
It installs one handler, on the root logger, writing ``FORMAT`` lines to stderr, and applies the
rules below to third-party libraries, each aimed at one library line and nothing else:

1. **Lightning's own handlers.** ``lightning/__init__.py`` (2.6) always adds a
   ``StreamHandler`` (``"%(levelname)s: %(message)s"``) to the ``lightning`` logger and leaves
   it propagating; ``lightning/pytorch/__init__.py``, ``lightning/fabric/__init__.py``,
   ``pytorch_lightning/__init__.py`` and ``lightning_fabric/__init__.py`` add one (and stop
   propagating) when the root logger has no handler yet, and all of them pin their logger to
   INFO. So every Lightning line ("GPU available: ...") came out twice, once bare and once
   through the root handler, or only bare, depending on the import order, and ignored
   ``--log-level``. Their loggers lose those handlers, propagate, and follow the root level.
   Lightning is imported late (only the commands that train import it, and it takes seconds),
   so the rule runs again right after its import (:class:`_AfterImport`).
2. **Lightning's "💡 Tip:" lines** advertise its cloud products on every ``Trainer``:
   ``_LoggerConnector.configure_logger`` (litlogger) and
   ``_CallbackConnector._maybe_show_litmodels_tip`` (litmodels), both through
   ``rank_zero_info`` on the ``*.utilities.rank_zero`` loggers. Lightning has no switch for them
   (Lightning-AI/pytorch-lightning#21294), so a filter on those loggers drops the records whose
   message starts with "💡 Tip:"; every other line of theirs is kept.
3. **onnxruntime's pre-processing advice.** ``onnxruntime.quantization.quantize_dynamic`` logs
   "Please consider to run pre-processing before quantization. Refer to example: <url>" at
   WARNING on the root logger on every int8 export (``model/export.py``); the export is
   deliberately dynamic quantization of the model as trained. A filter on the root logger drops
   that one record (only when it comes from onnxruntime's quantization package).
4. **aiokafka's coordinator election.** ``GroupCoordinator.ensure_coordinator_known``
   (``aiokafka/consumer/group_coordinator.py``) logs "Group Coordinator Request failed: %s" at
   ERROR, then retries, for every error of the FindCoordinator lookup. While a fresh broker
   elects the coordinator of a group (the first group after ``make stack-up``), the broker answers
   ``GroupCoordinatorNotAvailableError`` (or ``NotCoordinatorForGroupError`` /
   ``GroupLoadInProgressError`` while the coordinator moves or loads), each ``retriable`` in
   ``aiokafka.errors``; aiokafka itself logs the same three at INFO when an offset commit meets
   them. Those records become INFO; the same line with any other error stays ERROR.

Nothing here hides asyncio's "Future/Task exception was never retrieved": those are bugs, fixed
where the future is (``stream/publisher.py``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# Rule 1: the loggers Lightning's package __init__ modules give a handler of their own.
LIGHTNING_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "lightning_fabric",
)
# The top-level packages whose import runs those __init__ modules (lightning's own imports
# lightning.pytorch and lightning.fabric).
LIGHTNING_PACKAGES = ("lightning", "pytorch_lightning", "lightning_fabric")

# Rule 2: where rank_zero_info logs (lightning_utilities.core.rank_zero.log, which each package's
# utilities/rank_zero.py replaces with its own logger on import).
RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)
TIP_PREFIX = "\N{ELECTRIC LIGHT BULB} Tip:"

# Rule 3.
ONNX_PREPROCESS_ADVICE = "Please consider to run pre-processing before quantization"

# Rule 4: (logger, message template) -> the retriable errors that are demoted, and to what.
COORDINATOR_LOOKUP = ("aiokafka.consumer.group_coordinator", "Group Coordinator Request failed: %s")
COORDINATOR_ELECTION_ERRORS = (
    "GroupCoordinatorNotAvailableError",
    "NotCoordinatorForGroupError",
    "GroupLoadInProgressError",
)


def configure_logging(level: str) -> None:
    """Set up this process's logging (see the module docstring); safe to call again.

    Like :func:`logging.basicConfig`, the stderr handler and the level are only set when the
    root logger has no handler of someone else's (a test runner's, for an in-process call).
    ``level``: a level name (``INFO``, ``warning``...); an unknown one raises ValueError."""
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, _StderrHandler)]
    if len(ours) == len(root.handlers):
        for h in ours:
            root.removeHandler(h)
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
        root.setLevel(str(level).upper())
    _add_filter(RANK_ZERO_LOGGERS, _DropLightningTips)
    _add_filter(["root"], _DropOnnxPreprocessAdvice)
    _add_filter([COORDINATOR_LOOKUP[0]], _DemoteCoordinatorElection)
    let_lightning_propagate()
    pending = [name for name in LIGHTNING_PACKAGES if name not in sys.modules]
    if pending:
        _AfterImport.install(pending, let_lightning_propagate)


def let_lightning_propagate() -> None:
    """Rule 1, now: Lightning's loggers without their own stream handlers, propagating, at the
    root's level."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            # Exactly Lightning's plain StreamHandlers: a test runner's capture handler (a
            # subclass) or a file handler someone added stays.
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


class _StderrHandler(logging.StreamHandler):
    """The root handler :func:`configure_logging` installs (a type of its own, so a second call
    replaces it instead of adding another)."""


def _add_filter(names: Iterable[str], kind: type[logging.Filter]) -> None:
    for name in names:
        logger = logging.getLogger(None if name == "root" else name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


class _DropLightningTips(logging.Filter):
    """Rule 2: drop Lightning's "💡 Tip:" advertising records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TIP_PREFIX)


class _DropOnnxPreprocessAdvice(logging.Filter):
    """Rule 3: drop onnxruntime's "Please consider to run pre-processing" advice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "root"
            and "onnxruntime" in record.pathname
            and "quantization" in record.pathname
            and record.getMessage().startswith(ONNX_PREPROCESS_ADVICE)
        )


class _DemoteCoordinatorElection(logging.Filter):
    """Rule 4: aiokafka's coordinator lookup failing with a coordinator-election error is INFO.

    A logger filter runs after the logger's own level check, so the record is then kept only if
    INFO is enabled for its logger (``--log-level WARNING`` hides it, as any INFO line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.levelno >= logging.ERROR
            and record.name == COORDINATOR_LOOKUP[0]
            and record.msg == COORDINATOR_LOOKUP[1]
            and isinstance(record.args, tuple)
            and len(record.args) == 1
            and _is_election_error(record.args[0])
        ):
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


def _is_election_error(err: object) -> bool:
    # Imported here, not at the top: the record comes from aiokafka, so it is loaded already,
    # while importing it for every ``worker`` command would cost ~0.3 s.
    import aiokafka.errors

    classes = tuple(getattr(aiokafka.errors, name) for name in COORDINATOR_ELECTION_ERRORS)
    return isinstance(err, classes)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` right after one of ``names`` has been imported (Python has no
    post-import hook). It finds nothing itself: for those names only, it asks the finders after
    it for the module's spec and wraps that one loader's ``exec_module``. It leaves
    ``sys.meta_path`` once every name ran."""

    def __init__(self, names: Iterable[str], callback: Callable[[], None]) -> None:
        self.names = set(names)
        self.callback = callback

    @classmethod
    def install(cls, names: Sequence[str], callback: Callable[[], None]) -> None:
        for finder in sys.meta_path:
            if isinstance(finder, cls) and finder.callback == callback:
                finder.names |= set(names)
                return
        sys.meta_path.insert(0, cls(names, callback))

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        loader = spec.loader if spec is not None else None
        exec_module = getattr(loader, "exec_module", None)
        if spec is None or exec_module is None:
            return spec
        self.names.discard(fullname)
        if not self.names and self in sys.meta_path:
            sys.meta_path.remove(self)
        callback = self.callback

        def exec_then_callback(module: ModuleType) -> None:
            exec_module(module)
            callback()

        # This module's loader only (file finders make one loader per spec).
        loader.exec_module = exec_then_callback  # type: ignore[union-attr]
        return spec
