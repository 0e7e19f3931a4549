"""Online interval calibration through the real worker on real data that drifts: a year of hourly
Seattle and San Francisco temperatures (vega_datasets), seasons and all, with the worker killed
with ``kill -9`` while it works through them.

The model is the session's untrained tiny one, whose static intervals are far too wide for these
series (about 95 % coverage at the 80 % level): the online rule has to narrow them, per series,
and keep them right through the autumn-to-winter weeks.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from tests.helpers.kafka import consume_all, produce
from tests.stream.conftest import Truth, worker_argv
from tests.stream.test_faults import (
    check_calibration,
    check_forecasts,
    check_windows,
    output_count,
    wait_all_forecasts,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LEVELS = {"80": 0.80, "95": 0.95}


def real_events() -> list[tuple[str, bytes]]:
    """Both data sets' points, interleaved in time order (one event per series per hour)."""
    from train.datasets import load_dataset

    rows: list[tuple[float, str, float]] = []
    for name in ("seattle-temps", "sf-temps"):
        df = load_dataset(name)
        rows += zip(df["ts"].tolist(), df["series_id"].tolist(), df["value"].tolist(), strict=True)
    rows.sort()
    return [(sid, orjson.dumps({"series_id": sid, "ts": ts, "value": v})) for ts, sid, v in rows]


def coverage(truth: Truth, by_src: dict[Any, Any]) -> dict[str, dict[str, float]]:
    """Per series and level: the share of forecasts whose next actual fell in the interval (the
    first copy of each forecast; repeats are identical, check_forecasts says so)."""
    out: dict[str, dict[str, float]] = {}
    for sid, evs in truth.events.items():
        hits = {lv: 0 for lv in LEVELS}
        n = 0
        for (p, o, _, _), (_, _, _, actual) in itertools.pairwise(evs[47:]):
            d = by_src[(p, o)][0]
            n += 1
            for lv in LEVELS:
                hits[lv] += d["lower"][lv][0] <= actual <= d["upper"][lv][0]
        out[sid] = {lv: hits[lv] / n for lv in LEVELS}
    return out


def test_online_intervals_keep_their_coverage_on_a_drifting_real_stream(
    stack: Any, topics: Any, redis_url: str, tiny_model_dir: Path, proc_worker: Any
) -> None:
    events = real_events()
    truth = Truth()
    truth.add(events, produce(stack.bootstrap, topics.input, events))
    argv = worker_argv(
        stack.bootstrap, redis_url, tiny_model_dir, topics,
        "--max-batch", "100", "--group-instance-id", "cal1",
    )  # fmt: skip

    # kill -9 (the worker does it to itself) after publishing its 40th batch, before committing
    # it: that batch's forecasts and calibration updates are in flight
    w = proc_worker(argv, env={"EVENTCAST_FAULT": "after_publish:40"})
    assert w.wait(180) == -9, w.log()
    at_kill = output_count(stack.bootstrap, topics.output)
    w = proc_worker(argv).wait_ready()
    wait_all_forecasts(stack.bootstrap, topics.output, truth, 240, worker=w)
    assert w.terminate() == 0, w.log()

    records = consume_all(stack.bootstrap, topics.output, idle=1.0, timeout=60)
    by_src = check_forecasts(records, truth)  # every forecast there, repeats identical
    repeats = len(records) - len(by_src)
    assert repeats > 0, "the kill hit no work in flight (nothing was forecast twice)"
    assert all(r.headers["calibration"] == "online" for r in records)
    check_windows(redis_url, topics.input, truth)
    compared = check_calibration(tiny_model_dir, truth, by_src)
    assert compared == len(records)

    cov = coverage(truth, by_src)
    print(f"\nCALIBRATION-STREAM forecasts {len(by_src)}, killed at {at_kill} published, "
          f"{repeats} repeated after the restart; coverage {cov}")  # fmt: skip
    for sid, c in cov.items():
        for lv, target in LEVELS.items():
            assert abs(c[lv] - target) <= 0.03, (sid, lv, c)
    # Each series' second half (the autumn-to-winter shift lies in it) keeps the promise too.
    for sid, evs in truth.events.items():
        half = Truth({sid: evs[len(evs) // 2 - 47 :]})
        late = coverage(half, by_src)[sid]
        for lv, target in LEVELS.items():
            assert abs(late[lv] - target) <= 0.03, (sid, "second half", lv, late)
    assert np.isfinite([d["upper"]["95"][0] for docs in by_src.values() for d in docs]).all()
