"""Clean logs on a clean run (deploy/logs.py, and the futures of stream/publisher.py).

A worker run end to end on real Kafka and Redis, a tiny retrain and a fenced transactional
producer must log no ERROR record, no asyncio "Future/Task exception was never retrieved", no
third-party advertising tip, and no line twice.

"Twice" (:func:`duplicated_lines`), precisely: two lines that show one log record, i.e.

- two identical lines in this project's format (same timestamp to the millisecond, level,
  logger and message) — one record through two handlers of the same format; or
- a line that is not in this project's format, next to (the line before or after) a line in it
  with the same message, the bare line being the message itself or ``LEVEL: message``
  (Lightning's own handler format) — one record through a second, foreign handler.

The same message logged again later (two join attempts, say) is not a duplicate: its own record,
with its own timestamp.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    GroupCoordinatorNotAvailableError,
    KafkaConnectionError,
    KafkaTimeoutError,
    NotCoordinatorForGroupError,
)

from deploy.logs import (
    _DemoteCoordinatorElection,
    _DropLightningTips,
    _DropOnnxPreprocessAdvice,
)
from deploy.stack import REPO, KafkaServer, create_topics
from tests.helpers.kafka import consume_all, produce
from tests.stream.conftest import ProcWorker, make_events, worker_argv

LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) "
    r"(?P<logger>\S+) (?P<msg>.*)$"
)
BARE_LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL): ")
NEVER_RETRIEVED = ("Future exception was never retrieved", "Task exception was never retrieved")
TIPS = ("\N{ELECTRIC LIGHT BULB}", "Tip:", "litlogger", "litmodels", "pre-processing before quant")


def duplicated_lines(text: str) -> list[str]:
    """The lines of ``text`` that repeat a log record shown already (module docstring)."""
    lines = text.splitlines()
    out = [line for line, n in Counter(ln for ln in lines if LINE.match(ln)).items() if n > 1]
    for i, line in enumerate(lines):
        if LINE.match(line) or not line.strip():
            continue
        bare = BARE_LEVEL.sub("", line)
        for j in (i - 1, i + 1):
            m = LINE.match(lines[j]) if 0 <= j < len(lines) else None
            if m and m["msg"] == bare:
                out.append(line)
    return out


def check_clean(text: str) -> None:
    """No ERROR line, nothing never retrieved, no tip, no duplicated line, and no line through
    a handler other than the root's (Lightning's bare ``INFO: ...``)."""
    errors = [ln for ln in text.splitlines() if " ERROR " in ln or ln.startswith("ERROR")]
    assert not errors, "\n".join(errors)
    for what in (*NEVER_RETRIEVED, *TIPS):
        assert what not in text, f"{what!r} in:\n{text[-6000:]}"
    assert not duplicated_lines(text), duplicated_lines(text)
    foreign = [ln for ln in text.splitlines() if BARE_LEVEL.match(ln)]
    assert not foreign, foreign


def test_duplicated_lines_definition() -> None:
    ts = "2026-11-30 22:26:16,070"
    lightning_twice = (
        "INFO: GPU available: False, used: False\n"
        f"{ts} INFO lightning.pytorch.utilities.rank_zero GPU available: False, used: False\n"
    )
    assert duplicated_lines(lightning_twice) == ["INFO: GPU available: False, used: False"]
    same_record = f"{ts} INFO a x\n{ts} INFO a x\n"
    assert duplicated_lines(same_record) == [f"{ts} INFO a x"]
    # Two records of the same message (two attempts), and a bare line of another message.
    retried = (
        f"{ts} INFO a (Re-)joining group g\n2026-11-30 22:26:16,300 INFO a (Re-)joining group g\n"
    )
    assert duplicated_lines(retried + "some warning text\n") == []


# ---- the rules, one by one ----------------------------------------------------------------------


def _record(name: str, level: int, msg: str, *args: Any, path: str = __file__) -> logging.LogRecord:
    return logging.LogRecord(name, level, path, 1, msg, args, None)


def test_coordinator_election_errors_are_info_and_others_stay_errors() -> None:
    f = _DemoteCoordinatorElection()
    name, msg = "aiokafka.consumer.group_coordinator", "Group Coordinator Request failed: %s"
    for err in (GroupCoordinatorNotAvailableError(), NotCoordinatorForGroupError()):
        rec = _record(name, logging.ERROR, msg, err)
        f.filter(rec)
        assert (rec.levelno, rec.levelname) == (logging.INFO, "INFO")
    # A real error on the same line, and a retriable error on another line, stay ERROR.
    for rec in (
        _record(name, logging.ERROR, msg, GroupAuthorizationFailedError()),
        _record(name, logging.ERROR, msg, KafkaConnectionError()),
        _record(
            name, logging.ERROR, "LeaveGroup request failed: %s", NotCoordinatorForGroupError()
        ),
    ):
        assert f.filter(rec) and rec.levelno == logging.ERROR


def test_tip_filters_drop_only_the_tips() -> None:
    tips = _DropLightningTips()
    rz = "lightning.pytorch.utilities.rank_zero"
    assert not tips.filter(_record(rz, logging.INFO, "\N{ELECTRIC LIGHT BULB} Tip: try litmodels"))
    assert tips.filter(_record(rz, logging.INFO, "GPU available: False, used: False"))
    onnx = _DropOnnxPreprocessAdvice()
    quantize = "/x/site-packages/onnxruntime/quantization/quantize.py"
    advice = "Please consider to run pre-processing before quantization. Refer to example: ..."
    assert not onnx.filter(_record("root", logging.WARNING, advice, path=quantize))
    assert onnx.filter(_record("root", logging.WARNING, advice))  # not onnxruntime's
    assert onnx.filter(_record("root", logging.INFO, "Ignore MatMul", path=quantize))


LIGHTNING_AFTER_CONFIGURE = """
import logging, sys
from deploy.logs import configure_logging
configure_logging(sys.argv[1])
import lightning  # after configure_logging, as in `worker retrain`
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    lg = logging.getLogger(name)
    assert lg.handlers == [] and lg.propagate and lg.level == logging.NOTSET, (name, lg.handlers)
rank_zero_info("an info line of Lightning's")
rank_zero_info("\N{ELECTRIC LIGHT BULB} Tip: For seamless cloud uploads, try installing litmodels")
logging.getLogger("lightning.pytorch.core").warning("a warning line of Lightning's")
"""


def test_lightning_imported_later_logs_through_the_root_once() -> None:
    """``--log-level WARNING`` (the demo's worker): Lightning's loggers, set up by its import
    after configure_logging, log WARNING lines once through the root handler and INFO lines not
    at all (its INFO lines at the default level: test_a_tiny_retrain_logs_each_line_once)."""
    proc = subprocess.run(
        [sys.executable, "-c", LIGHTNING_AFTER_CONFIGURE, "WARNING"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    check_clean(err)
    assert err.count("a warning line of Lightning's") == 1
    assert " WARNING lightning.pytorch.core a warning line of Lightning's" in err
    # Lightning's INFO lines follow --log-level (Lightning pinned its loggers to INFO).
    assert "an info line of Lightning's" not in err


def test_a_tiny_retrain_logs_each_line_once(tmp_path: Path) -> None:
    """The trainer's entry point (``worker retrain``, as tests/train runs it), one epoch of a
    tiny network: each Lightning line once, in the project's format, no tips."""
    from train.sources import synthetic_frame

    data = tmp_path / "synthetic.csv"
    synthetic_frame(n_series=2, length=400, spacing=3600.0, seed=1).to_csv(data, index=False)
    proc = subprocess.run(
        [
            sys.executable, "-m", "deploy.cli", "retrain", "--data", str(data),
            "--model-dir", str(tmp_path / "models"), "--run-dir", str(tmp_path / "runs"),
            "--max-epochs", "1", "--logger", "none",
            "--hidden-size", "16", "--num-layers", "1", "--dropout", "0", "--threads", "1",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    err = proc.stderr
    check_clean(err)
    # Lightning's lines are there, once each, through the root handler.
    gpu = [ln for ln in err.splitlines() if "GPU available:" in ln]
    assert len(gpu) == 1 and " INFO lightning.pytorch.utilities.rank_zero " in gpu[0], err
    assert err.count("`Trainer.fit` stopped") == 1


# ---- the worker end to end ---------------------------------------------------------------------


def run_worker(
    bootstrap: str, redis_url: str, model_dir: Path, tmp_path: Path, *extra: str, partitions: int
) -> str:
    """Create fresh topics (``partitions`` input partitions), start ``worker start`` as a
    subprocess (``--log-level`` INFO), feed it events until it published every forecast, stop it
    with SIGTERM; its whole output."""
    tag = uuid.uuid4().hex[:10]
    topics = SimpleNamespace(
        input=f"logs-{tag}.in", output=f"logs-{tag}.out", dlq=f"logs-{tag}.dlq"
    )
    create_topics(bootstrap, {topics.input: partitions, topics.output: 3, topics.dlq: 1})
    argv = worker_argv(bootstrap, redis_url, model_dir, topics, "--redis-prefix", tag, *extra)
    worker = ProcWorker(argv, tmp_path / f"worker-{tag}.log")
    try:
        worker.wait_ready(90)
        n_series, n_events = 4, 60
        produce(bootstrap, topics.input, make_events(n_series, n_events))
        expected = n_series * (n_events - 47)
        got = consume_all(
            bootstrap, topics.output, expected=expected, timeout=90,
            isolation_level="read_committed",
        )  # fmt: skip
        assert len(got) >= expected, f"{len(got)} of {expected} forecasts\n{worker.log()}"
        assert worker.terminate(60) == 0, worker.log()
    finally:
        worker.kill()
    return worker.log_path.read_text(errors="replace")


@pytest.mark.integration
def test_worker_run_logs_clean_on_the_stack(
    stack: Any, redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The default guarantee on the suite's stack."""
    log = run_worker(stack.bootstrap, redis_url, tiny_model_dir, tmp_path, partitions=3)
    check_clean(log)


@pytest.mark.integration
def test_exactly_once_worker_logs_clean_on_a_fresh_broker(
    private_kafka: KafkaServer, redis_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A broker that never saw a group or a transaction (as after a first ``make stack-up``):
    the group and transaction coordinators are elected while the worker starts, which aiokafka
    logs as ERROR (GroupCoordinatorNotAvailableError) unless deploy/logs.py demotes it.

    One input partition: each partition has a transactional producer of its own, and each logs
    "Discovered coordinator ... for group id ..." (aiokafka.producer.sender) when it first sends
    offsets, so with several partitions that line shows several times in the same millisecond:
    separate records that text alone cannot tell from one record shown twice."""
    log = run_worker(
        private_kafka.bootstrap, redis_url, tiny_model_dir, tmp_path,
        "--guarantee", "exactly_once", partitions=1,
    )  # fmt: skip
    check_clean(log)


# ---- a fenced transactional producer -----------------------------------------------------------


class _Recorder:
    """asyncio's exception handler of the test loop: what would have been logged at ERROR."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.messages.append(f"{context.get('message')}: {context.get('exception')!r}")


def _collect_garbage() -> None:
    for _ in range(3):
        gc.collect()


@pytest.mark.integration
def test_a_fenced_transactional_producer_is_given_up_cleanly(
    stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A zombie's situation, forced: a second publisher of the same group opens the partition
    (as the new owner does), which fences the first one's producer. The first learns it once
    (PartitionFencedError, first=True), then fails at once without restarting its producer (the
    new owner's transactions keep succeeding: it was not fenced back), and no future of the
    fenced producer is left with an unretrieved exception."""
    from stream.publisher import OutMessage, PartitionFencedError, TransactionalPublisher
    from stream.settings import KafkaSettings

    tag = uuid.uuid4().hex[:10]
    topic_in, topic_out = f"fence-{tag}.in", f"fence-{tag}.out"
    create_topics(stack.bootstrap, {topic_in: 2, topic_out: 3})
    msgs = [OutMessage(topic_out, f"s{i}".encode(), b"x" * 64, None, []) for i in range(30)]
    recorder = _Recorder()

    async def run() -> list[tuple[bool, str]]:
        asyncio.get_running_loop().set_exception_handler(recorder)
        kafka = KafkaSettings(bootstrap_servers=stack.bootstrap)
        zombie = TransactionalPublisher(kafka, f"g-{tag}", topic_in)
        owner = TransactionalPublisher(kafka, f"g-{tag}", topic_in)
        # (first, cause) of each failure; not the exceptions themselves: their tracebacks would
        # keep the fenced producer, and its futures, from being collected below.
        outcomes: list[tuple[bool, str]] = []
        try:
            await zombie.publish_and_commit(0, msgs, 10)
            await owner.open(0)  # the new owner: fences the zombie's producer
            for offset in (20, 30):
                try:
                    await zombie.publish_and_commit(0, msgs, offset)
                except PartitionFencedError as exc:
                    outcomes.append((exc.first, type(exc.cause).__name__))
                await owner.publish_and_commit(0, msgs, offset)  # still the owner
            assert zombie.fenced(0) and not owner.fenced(0)
            await zombie.close(0)  # revoked: the fence is forgotten
            assert not zombie.fenced(0)
        finally:
            await zombie.stop()
            await owner.stop()
        _collect_garbage()
        await asyncio.sleep(0.1)
        _collect_garbage()
        return outcomes

    with caplog.at_level(logging.WARNING):
        outcomes = asyncio.run(run())
        _collect_garbage()
    assert outcomes == [(True, "ProducerFenced"), (False, "NoneType")]
    assert recorder.messages == []
    for what in NEVER_RETRIEVED:
        assert what not in caplog.text


@pytest.mark.integration
def test_exactly_once_delivery_warns_once_when_fenced(
    stack: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """stream/delivery.py on a fence: one WARNING naming the lost partition, no ERROR, the
    partition reset (reprocessed from its committed offset if it is still ours), and the
    transactions of the partitions it still owns committed."""
    from aiokafka import TopicPartition

    from stream.delivery import DeliveryContext, ExactlyOnce
    from stream.faults import FaultInjector
    from stream.health import Pauses
    from stream.metrics import Metrics
    from stream.publisher import OutMessage, TransactionalPublisher
    from stream.settings import KafkaSettings

    tag = uuid.uuid4().hex[:10]
    topic_in, topic_out = f"fencedlv-{tag}.in", f"fencedlv-{tag}.out"
    create_topics(stack.bootstrap, {topic_in: 2, topic_out: 2})
    lost, kept = TopicPartition(topic_in, 0), TopicPartition(topic_in, 1)

    class FakePartitions:
        def __init__(self) -> None:
            self.resets: list[TopicPartition] = []
            self.persisted: list[TopicPartition] = []

        async def reset(self, tp: TopicPartition) -> None:
            self.resets.append(tp)

        async def persist(self, persist: dict[TopicPartition, Any]) -> set[TopicPartition]:
            self.persisted += list(persist)
            return set(persist)

    recorder = _Recorder()

    async def run() -> FakePartitions:
        asyncio.get_running_loop().set_exception_handler(recorder)
        kafka = KafkaSettings(bootstrap_servers=stack.bootstrap)
        txn = TransactionalPublisher(kafka, f"g-{tag}", topic_in)
        new_owner = TransactionalPublisher(kafka, f"g-{tag}", topic_in)
        metrics = Metrics()
        parts = FakePartitions()
        ctx = DeliveryContext(
            parts, metrics, FaultInjector(None), Pauses(metrics.paused, lambda paused: None),  # type: ignore[arg-type]
            f"{topic_out}.dlq", lambda: False,
        )  # fmt: skip
        delivery = ExactlyOnce(txn, ctx)
        msgs = {tp: [OutMessage(topic_out, b"k", b"v", None, [])] for tp in (lost, kept)}
        try:

            async def deliver(nxt: int) -> None:  # as stream.batch does: publish, then persist
                done = await delivery.publish(msgs, {lost: nxt, kept: nxt})
                await delivery.persist({tp: None for tp in done})  # type: ignore[misc]

            await deliver(5)
            await new_owner.open(lost.partition)
            for nxt in (6, 7):
                await deliver(nxt)
        finally:
            await txn.stop()
            await new_owner.stop()
        _collect_garbage()
        await asyncio.sleep(0.1)
        return parts

    with caplog.at_level(logging.DEBUG, logger="stream"):
        start = time.monotonic()
        parts = asyncio.run(run())
        _collect_garbage()
    assert time.monotonic() - start < 60
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings if "lost input partition" in r.getMessage()] == [
        f"lost input partition {topic_in}[0]: its transactional producer was fenced "
        "(ProducerFenced: another worker took the partition over); transaction aborted, the "
        "batch is left to the new owner"
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert parts.resets == [lost, lost]
    assert parts.persisted == [lost, kept, kept, kept]
    assert recorder.messages == []


# ---- the at-least-once path: records queued before a failed send -------------------------------


def test_futures_queued_before_a_failed_send_are_retrieved() -> None:
    """``_send_all`` queued a record batch, then the next send failed: the caller resends all
    and never awaits the first batch's future; when that one fails too, its exception is
    retrieved (no "Future exception was never retrieved")."""
    from stream.publisher import OutMessage, _Partitioner, _send_all

    recorder = _Recorder()

    class Builder:
        def append(self, **record: Any) -> object:
            return object()

        def close(self) -> None:
            pass

    async def run() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(recorder)
        queued: list[asyncio.Future[Any]] = []

        class Producer:
            async def partitions_for(self, topic: str) -> set[int]:
                return {0, 1}

            def create_batch(self) -> Builder:
                return Builder()

            async def send_batch(self, builder: Builder, topic: str, partition: int) -> Any:
                if queued:
                    raise KafkaConnectionError()
                queued.append(loop.create_future())
                return queued[-1]

        # No keys: round robin, so the two records go to two partitions (two record batches).
        msgs = [OutMessage("t", None, b"%d" % i, None, []) for i in range(2)]
        with pytest.raises(KafkaConnectionError):
            await _send_all(Producer(), _Partitioner(), msgs)  # type: ignore[arg-type]
        queued[0].set_exception(KafkaTimeoutError())
        await asyncio.sleep(0)
        queued.clear()
        _collect_garbage()

    asyncio.run(run())
    _collect_garbage()
    assert recorder.messages == []
