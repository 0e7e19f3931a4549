"""Scale-out (issue 19): three workers on a 12-partition topic under steady load, the group's
assignment read through the Kafka admin API (DescribeGroups, :class:`GroupSampler`: one reading
a second, no group membership) beside each worker's own view (``eventcast_assigned_partitions``
and the partitions it completed batches of: its ``eventcast_consumer_lag`` labels).

- Workers join and leave (A and B start; C joins; B leaves with SIGTERM; B comes back): once
  each rebalance settles every partition is owned by exactly one worker and the split is even
  (6/6, 4/4/4); the whole output equals ground truth.
- Static membership (``--group-instance-id``): a rolling restart, each worker in turn stopped
  with SIGTERM and started again within the session timeout, causes no rebalance: the group
  stays ``Stable`` and the assignment by instance id never changes; the output equals ground
  truth.

Each prints one ``FAULT-SUMMARY`` line with its figures (``-s``), as tests/stream/
test_fault_model.py does: the partitions per worker at each settled point, the assignment
changes the sampler saw, the rebalances (new group generations in the workers' logs: aiokafka's
"Joined group ... (generation N)"), and produced / expected / delivered / duplicates / missing.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.faults import (
    GroupSampler,
    GroupView,
    LoadProducer,
    assignment_changes,
    describe_group,
    input_record_count,
    joined_generations,
    owned_partitions,
    sample,
    static_instance,
    truth_from_topic,
)
from tests.stream.conftest import make_events, wait_for, worker_argv
from tests.stream.test_fault_model import check_output, new_topics, summary
from tests.stream.test_faults import wait_all_forecasts

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 12
N_SERIES = 36  # murmur2 of s0..s35 puts 1 to 6 series on each of the 12 partitions
# The static scenario's session timeout: above a worker's start-up on a loaded 2-core machine
# (see test_static_members_rolling_restart_without_rebalance), far below the broker's cap
# (group.max.session.timeout.ms, 30 min by default).
STATIC_SESSION_MS = 45_000
REVOKED = re.compile(r"partitions revoked: \[\d")  # stream/partitions.py, a non-empty set


def load(bootstrap: str, topic: str) -> LoadProducer:
    """Steady load: one event per series every 0.15 s (240 events/s over the 12 partitions)."""
    return LoadProducer(
        bootstrap, topic, lambda i: make_events(N_SERIES, 1, start=i), interval=0.15
    ).start()


def settle(
    bootstrap: str, group: str, topic: str, workers: dict[str, Any], timeout: float = 90
) -> tuple[GroupView, dict[str, tuple[int, ...]]]:
    """Wait until the rebalance settled: the group ``Stable`` with one member per worker, every
    partition owned by exactly one member, the split even (within one partition), two readings
    alike, and each worker's own view (its ``eventcast_assigned_partitions`` and the partitions
    it completed batches of) equal to one member's partitions. Returns the group's reading and
    each worker's partitions (by its label)."""
    last: dict[str, Any] = {}

    def settled() -> bool:
        for w in workers.values():
            w.check()
        view = describe_group(bootstrap, group, topic)
        last["view"] = view
        if view.state != "Stable" or len(view.members) != len(workers):
            return False
        if not view.whole(PARTITIONS) or not view.even():
            return False
        members = set(view.members.values())
        mine: dict[str, tuple[int, ...]] = {}
        for label, w in workers.items():
            text = w.metrics()
            owned = tuple(sorted(owned_partitions(text)))
            gauge = sample(text, "eventcast_assigned_partitions")
            last[label] = (owned, gauge)
            if owned not in members or gauge != len(owned):
                return False
            mine[label] = owned
        again = describe_group(bootstrap, group, topic)
        last["again"] = again
        if again.state != "Stable" or again.members != view.members:
            return False
        last["mine"] = mine
        return True

    try:
        wait_for(settled, timeout, f"{len(workers)} workers settled", every=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last readings: {last}") from None
    return last["again"], last["mine"]


def split_line(mine: dict[str, tuple[int, ...]]) -> str:
    return "+".join(f"{label}{len(parts)}" for label, parts in sorted(mine.items()))


def full_log(w: Any, start: int = 0) -> str:
    with open(w.log_path, "rb") as f:
        f.seek(start)
        return f.read().decode(errors="replace")


def test_workers_join_and_leave_under_load_even_split(
    stack: Any, private_redis: Any, tiny_model_dir: Path, proc_worker: Any
) -> None:
    """A and B start; C joins; B leaves (SIGTERM: it finishes its batch, commits, sends
    LeaveGroup); B comes back; all under steady load (dynamic members, the tests' 6 s session
    timeout). At each settled point: every partition owned by exactly one worker (the group's
    assignment and the workers' own views alike), 6/6 or 4/4/4. Every ``Stable`` reading of
    the sampler (one a second) is whole and even, each settled assignment was seen by it, and
    the whole output equals ground truth."""
    bootstrap = stack.bootstrap
    topics = new_topics(bootstrap, PARTITIONS)
    group = f"g-{topics.input}"
    argv = worker_argv(
        bootstrap, private_redis.url, tiny_model_dir, topics,
        "--max-batch", "200", "--max-delay-ms", "50",
    )  # fmt: skip
    sampler = GroupSampler(bootstrap, group, topics.input).start()
    t0 = time.monotonic()
    workers: dict[str, Any] = {}
    every_proc: list[Any] = []
    startup: list[float] = []
    points: list[tuple[GroupView, dict[str, tuple[int, ...]]]] = []

    def start(labels: str) -> None:
        began = {}
        for label in labels:
            began[label] = time.monotonic()
            workers[label] = proc_worker(argv)
            every_proc.append(workers[label])
        for label in labels:
            workers[label].wait_ready(90)
            startup.append(time.monotonic() - began[label])

    def point() -> None:
        view, mine = settle(bootstrap, group, topics.input, workers)
        points.append((view, mine))
        # The sampler reads once a second: before the next step changes the assignment, let it
        # read this one too (CI once moved on within its second, and it never saw the split).
        wait_for(
            lambda: any(v.members == view.members for v in sampler.since(view.at - 1.0)),
            20, "the sampler reading the settled assignment", every=0.2,
        )  # fmt: skip

    start("AB")
    producer = load(bootstrap, topics.input)
    try:
        point()  # A, B: 6/6
        start("C")
        point()  # A, B, C: 4/4/4
        b = workers.pop("B")
        assert b.terminate() == 0, b.log()
        point()  # A, C: 6/6
        start("B")
        point()  # A, B, C: 4/4/4
        time.sleep(3)  # more load on the final assignment
    finally:
        producer.stop()
        views = sampler.stop()
    elapsed = time.monotonic() - t0
    truth = truth_from_topic(bootstrap, topics.input)
    assert producer.acked == input_record_count(bootstrap, topics.input)
    wait_all_forecasts(bootstrap, topics.output, truth, 120, worker=workers["A"])
    for w in workers.values():
        w.check()
    for w in workers.values():
        assert w.terminate() == 0, w.log()
    left = sum(full_log(w).count("LeaveGroup request succeeded") for w in every_proc)
    generations = sorted({g for w in every_proc for g in joined_generations(full_log(w), group)})
    changes = assignment_changes(views)
    rebalancing = sum(1 for v in views if v.state in ("PreparingRebalance", "CompletingRebalance"))

    def report(figures: dict[str, Any]) -> None:
        summary(
            "scale_out_join_leave",
            partitions=PARTITIONS, settled=";".join(split_line(m) for _, m in points),
            samples=len(views), sample_errors=sampler.errors, assignment_changes=changes,
            rebalancing_samples=rebalancing, generations=len(generations),
            rebalances=max(0, len(generations) - 1), startup_s=max(round(s, 1) for s in startup),
            leave_group_sent=left, elapsed_s=round(elapsed), produced=producer.acked, **figures,
        )  # fmt: skip

    check_output(bootstrap, topics, truth, private_redis.url, PARTITIONS, "at_least_once", report)
    assert [sorted(len(p) for p in m.values()) for _, m in points] == [
        [6, 6], [4, 4, 4], [6, 6], [4, 4, 4],
    ]  # fmt: skip
    assert len(views) >= elapsed / 2, f"{len(views)} readings in {elapsed:.0f} s"
    bad = [v for v in views if v.state == "Stable" and not (v.whole(PARTITIONS) and v.even())]
    assert not bad, f"Stable readings not whole or not even: {bad}"
    for view, _ in points:
        assert any(v.members == view.members for v in views), f"sampler never saw {view}"
    # Formation, C joins, B leaves, B joins: at least three changes and four generations.
    assert changes >= 3 and len(generations) >= 4, (changes, generations)


def test_static_members_rolling_restart_without_rebalance(
    stack: Any, private_redis: Any, tiny_model_dir: Path, proc_worker: Any
) -> None:
    """Three static members (``--group-instance-id inst-a|b|c``, ``--session-timeout-ms
    45000``) under steady load; each in turn is stopped with SIGTERM and started again with the
    same instance id, the next one once it works on its partitions again. aiokafka (0.14,
    ``GroupCoordinator._maybe_leave_group``) sends no LeaveGroup for a static member on close,
    so the broker keeps the member until its session times out; a member that comes back in
    time replaces its old member id and gets its partitions back, with no rebalance.

    45 s: a worker's start-up (process start to ``/readyz``) measured 2.7-2.9 s on this
    project's 2-core machine with the other two workers and the producer busy (2.9 s for two
    started together), a restart (SIGTERM to working on its partitions again) 3.4-3.6 s; 45 s is
    over ten times that, room for a slower or more loaded node and a model load from slow
    storage, while a member that really died still has its partitions moved within a minute
    (the 6 s of the other tests is only twice a start-up). The test asserts each restart stayed
    within the timeout.

    Throughout the restarts (one reading a second): the group is ``Stable`` with three members,
    the assignment by instance id never changes, each instance's member id is replaced exactly
    once (the restarts were seen), no worker joins a new generation, no worker has a partition
    revoked; then the whole output equals ground truth."""
    bootstrap = stack.bootstrap
    topics = new_topics(bootstrap, PARTITIONS)
    group = f"g-{topics.input}"
    base = worker_argv(
        bootstrap, private_redis.url, tiny_model_dir, topics,
        "--max-batch", "200", "--max-delay-ms", "50",
        "--session-timeout-ms", str(STATIC_SESSION_MS),
    )  # fmt: skip

    def instance(label: str) -> str:
        return f"inst-{label.lower()}"

    def argv(label: str) -> list[str]:
        return [*base, "--group-instance-id", instance(label)]

    sampler = GroupSampler(bootstrap, group, topics.input).start()
    workers = {label: proc_worker(argv(label)) for label in "ABC"}
    procs = list(workers.values())  # every process, the restarted ones added
    for w in workers.values():
        w.wait_ready(90)
    producer = load(bootstrap, topics.input)
    restarts: list[dict[str, float]] = []
    try:
        view0, mine0 = settle(bootstrap, group, topics.input, workers)
        by_instance = view0.keyed(static_instance)
        assert by_instance == {instance(k): v for k, v in mine0.items()}, (view0, mine0)
        generation = max(g for w in procs for g in joined_generations(full_log(w), group))
        marks = [w.log_path.stat().st_size for w in procs]
        t_mark = time.monotonic()
        for label in "ABC":
            old = workers[label]
            t_stop = time.monotonic()
            assert old.terminate() == 0, old.log()
            t_start = time.monotonic()
            new = workers[label] = proc_worker(argv(label))
            procs.append(new)
            marks.append(0)
            new.wait_ready(STATIC_SESSION_MS / 1000)
            t_ready = time.monotonic()

            def back(w: Any = new, want: tuple[int, ...] = mine0[label]) -> bool:
                return tuple(sorted(owned_partitions(w.metrics()))) == want

            wait_for(back, STATIC_SESSION_MS / 1000, f"{label} working on its partitions again")
            gap = time.monotonic() - t_stop
            restarts.append(
                {"stop_s": t_start - t_stop, "startup_s": t_ready - t_start, "gap_s": gap}
            )
        time.sleep(3)  # more load with every worker restarted
        t_end = time.monotonic()
        view1, mine1 = settle(bootstrap, group, topics.input, workers)
    finally:
        producer.stop()
        sampler.stop()
    window = [v for v in sampler.since(t_mark) if v.at <= t_end]
    truth = truth_from_topic(bootstrap, topics.input)
    assert producer.acked == input_record_count(bootstrap, topics.input)
    wait_all_forecasts(bootstrap, topics.output, truth, 120, worker=workers["A"])
    for w in workers.values():
        w.check()
    for w in workers.values():
        assert w.terminate() == 0, w.log()
    # What the workers' logs say happened after the mark: generations joined (a restarted
    # member joins the current one again; a rebalance makes a new one) and partitions revoked.
    texts = [full_log(w, mark) for w, mark in zip(procs, marks, strict=True)]
    joined = sorted({g for t in texts for g in joined_generations(t, group)})
    rebalances = len(set(joined) - {generation})
    revoked = sum(len(REVOKED.findall(t)) for t in texts)
    left = sum(t.count("LeaveGroup request") for t in texts)  # aiokafka's line when it leaves
    changes = assignment_changes(window, static_instance)
    not_stable = sum(1 for v in window if v.state != "Stable")
    ids: dict[str, set[str]] = {}
    for v in window:
        for m in v.members:
            ids.setdefault(static_instance(m), set()).add(m)
    replaced = sum(len(x) - 1 for x in ids.values())

    def report(figures: dict[str, Any]) -> None:
        summary(
            "static_rolling_restart",
            partitions=PARTITIONS, session_timeout_ms=STATIC_SESSION_MS,
            settled=f"{split_line(mine0)};{split_line(mine1)}",
            startup_s="/".join(f"{r['startup_s']:.1f}" for r in restarts),
            stop_s="/".join(f"{r['stop_s']:.1f}" for r in restarts),
            restart_gap_s="/".join(f"{r['gap_s']:.1f}" for r in restarts),
            samples=len(window), sample_errors=sampler.errors, assignment_changes=changes,
            not_stable_samples=not_stable, member_ids_replaced=replaced, generation=generation,
            generations_joined=",".join(map(str, joined)), rebalances=rebalances,
            partitions_revoked=revoked, leave_group_sent=left, produced=producer.acked, **figures,
        )  # fmt: skip

    check_output(bootstrap, topics, truth, private_redis.url, PARTITIONS, "at_least_once", report)
    slow = [r for r in restarts if r["gap_s"] >= STATIC_SESSION_MS / 1000]
    assert not slow, f"restarts longer than the session timeout: {slow}"
    duration = t_end - t_mark
    assert len(window) >= duration / 2, f"{len(window)} readings in {duration:.0f} s"
    assert not_stable == 0, [v for v in window if v.state != "Stable"]
    assert changes == 0, [v.keyed(static_instance) for v in window]
    assert all(v.keyed(static_instance) == by_instance for v in window)
    assert mine1 == mine0 and view1.keyed(static_instance) == by_instance, (mine0, mine1)
    assert {k: len(x) for k, x in ids.items()} == {instance(k): 2 for k in "ABC"}, ids
    assert rebalances == 0 and joined == [generation], (generation, joined)
    assert revoked == 0 and left == 0, (revoked, left)
