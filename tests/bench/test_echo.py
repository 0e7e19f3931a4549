"""bench/echo_worker.py, the latency floor's pass-through group member, against the test stack's
real broker: every input record comes back out once, on its own partition with its own key,
naming its source (the join the latency curve's reader makes), and the member stops on SIGTERM."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from tests.helpers.kafka import consume_all, produce
from tests.stream.conftest import REPO

if TYPE_CHECKING:
    from tests.conftest import TestStack


def test_every_record_comes_back_naming_its_source(
    stack: TestStack, make_topic: Callable[..., str]
) -> None:
    src, out = make_topic("echo-in", 3), make_topic("echo-out", 3)
    placed = produce(stack.bootstrap, src, [(f"s{i % 5}", f'{{"value": {i}}}') for i in range(40)])
    argv = [
        sys.executable, "-m", "bench.echo_worker", "--bootstrap-servers", stack.bootstrap,
        "--input-topic", src, "--output-topic", out, "--group-id", f"g-{src}",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        got = consume_all(stack.bootstrap, out, expected=len(placed), timeout=90)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    keys = {at: f"s{i % 5}".encode() for i, at in enumerate(placed)}  # (partition, offset)
    sources = []
    for rec in got:
        source = orjson.loads(rec.value or b"")["source"]
        at = (source["partition"], source["offset"])
        assert source["topic"] == src and source["partition"] == rec.partition
        assert rec.key == keys[at]
        sources.append(at)
    assert sorted(sources) == sorted(placed)  # each once
