"""The short, seeded version of the randomized fault run (tests/chaos.py; `make chaos` runs the
long one): 2–3 workers on a 6-partition topic under steady load while a seeded scheduler injects
worker kill -9 / freeze / join / leave, broker kill -9, Redis kill -9 (with and without losing its
AOF tail) and Redis pauses; then one checker over the whole history must find zero anomalies.

It starts its own Kafka and Redis (free ports), so it does not touch the suite's stack. The seed
is in the output; `python -m tests.chaos --seed SEED --minutes M --guarantee G` replays it."""

from __future__ import annotations

import pytest

from tests.chaos import FAULTS, run_chaos

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 20261130


@pytest.mark.timeout(280)
def test_short_seeded_chaos_run_finds_no_anomaly(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_chaos(SEED, 0.9, "exactly_once", gap=(3.0, 7.0), drain_timeout=120.0)
    with capsys.disabled():
        print(f"\nchaos seed {SEED}, exactly_once\n{result.table()}")
    assert sum(result.faults.values()) >= 4, result.table()  # the run did inject faults
    assert set(result.faults) <= set(FAULTS)
    assert result.forecasts > 0
    assert not result.anomalies, result.table()
