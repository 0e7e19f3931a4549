"""The short, seeded version of the randomized fault run (tests/chaos.py; `make chaos` runs the
long one): 2–3 workers on a 6-partition topic under steady load while a seeded scheduler injects
worker kill -9 / freeze / join / leave, broker kill -9, Redis kill -9 (with and without losing its
AOF tail) and Redis pauses; then one checker over the whole history must find zero anomalies.

It starts its own Kafka and Redis (free ports), so it does not touch the suite's stack. The seed
is in the output; `python -m tests.chaos --seed SEED --minutes M --guarantee G` replays it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from tests.chaos import FAULTS, run_chaos

SEED = 20261130


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(280)
def test_short_seeded_chaos_run_finds_no_anomaly(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_chaos(SEED, 0.9, "exactly_once", gap=(3.0, 7.0), drain_timeout=120.0)
    with capsys.disabled():
        print(f"\nchaos seed {SEED}, exactly_once\n{result.table()}")
    assert sum(result.faults.values()) >= 4, result.table()  # the run did inject faults
    assert set(result.faults) <= set(FAULTS)
    assert result.forecasts > 0
    assert not result.anomalies, result.table()


def _synthetic(guarantee: str, n: int = 50) -> Any:
    """A clean history of one series: n events on partition 0, forecasts from the 48th on."""
    import numpy as np
    import orjson

    from tests.chaos import History
    from tests.stream.conftest import STEP, T0

    inputs, outputs, acked = [], [], {}
    for i in range(n):
        v = orjson.dumps({"series_id": "s0", "ts": T0 + i * STEP, "value": float(i)})
        inputs.append(SimpleNamespace(partition=0, offset=i, value=v, headers={}))
        acked[(0, i)] = v
        if i >= 47:
            doc = {"series_id": "s0", "ts": T0 + i * STEP, "mean": [1.0], "std": [1.0],
                   "lower": {"80": [0.0]}, "upper": {"80": [2.0]}, "model_version": "v",
                   "source": {"topic": "in", "partition": 0, "offset": i},
                   "emitted_at": 1.0}  # fmt: skip
            outputs.append(SimpleNamespace(value=orjson.dumps(doc)))
    kept = range(max(0, n - 96), n)
    window = SimpleNamespace(
        offsets=np.array(list(kept)),
        ts=np.array([T0 + i * STEP for i in kept]),
        values=np.array([float(i) for i in kept]),
    )
    return History(guarantee, 1, inputs, acked, outputs, [], {"s0": window}, None)


def test_the_checker_finds_what_it_promises() -> None:
    """check_history on a clean synthetic history finds nothing; each planted fault is found."""
    import orjson

    from tests.chaos import check_history

    assert not check_history(_synthetic("exactly_once"))[0]
    assert not check_history(_synthetic("at_least_once"))[0]

    h = _synthetic("exactly_once")
    h.outputs.pop(1)
    assert check_history(h)[0] == {"missing_forecast": 1}

    h = _synthetic("exactly_once")
    h.outputs.append(h.outputs[0])
    # the repeat also comes after later offsets of its series
    assert set(check_history(h)[0]) == {
        "duplicate_forecast",
        "duplicate_by_series_ts",
        "out_of_order",
    }
    h.guarantee = "at_least_once"
    assert not check_history(h)[0]  # an identical repeat is fine at least once

    h = _synthetic("at_least_once")
    doc = orjson.loads(h.outputs[0].value)
    doc["mean"] = [1.5]
    h.outputs.append(SimpleNamespace(value=orjson.dumps(doc)))
    assert check_history(h)[0] == {"repeat_differs": 1}

    h = _synthetic("at_least_once")
    doc = orjson.loads(h.outputs[0].value)
    doc["source"]["offset"] = 3  # an event whose window was not full
    doc["ts"] = orjson.loads(h.inputs[3].value)["ts"]
    h.outputs.append(SimpleNamespace(value=orjson.dumps(doc)))
    doc = dict(doc, source={"topic": "in", "partition": 0, "offset": 999})
    h.outputs.append(SimpleNamespace(value=orjson.dumps(doc)))
    assert check_history(h)[0] == {"forecast_not_expected": 1, "forecast_for_unknown_record": 1}

    h = _synthetic("at_least_once")
    h.windows["s0"].values[-1] += 1.0
    assert check_history(h)[0] == {"window_mismatch": 1}

    h = _synthetic("at_least_once")
    h.acked[(0, 500)] = h.inputs[0].value
    assert check_history(h)[0] == {"acked_event_lost": 1}

    h = _synthetic("at_least_once")
    h.dead_letters.append(SimpleNamespace(headers={"source.partition": "0", "source.offset": "5"}))
    assert check_history(h)[0] == {"dead_letter_for_accepted_event": 1}


def test_the_checker_finds_an_interval_from_a_wrong_calibration_state(
    tiny_model_dir: Any,
) -> None:
    """With online calibration (the forecasts' header says so), each forecast's bounds must equal
    the replay of the rule over the true history: a clean history passes, one bound moved is found,
    and a history whose calibration missed one update (a lost write) is found from there on."""
    import numpy as np
    import orjson

    from model.features import build_inputs
    from model.registry import ModelRegistry
    from stream.calibration import OnlineCalibrator
    from tests.chaos import check_history
    from tests.stream.conftest import STEP, T0

    def history(skip_update: int | None = None) -> Any:
        h = _synthetic("at_least_once", n=120)
        h.model_dir = tiny_model_dir
        ts = np.array([T0 + i * STEP for i in range(120)])
        vals = np.sin(np.arange(120) / 4.0) * 3  # values the checker reads from the inputs
        docs = [
            {"series_id": "s0", "ts": float(ts[i]), "value": float(vals[i])} for i in range(120)
        ]
        h.inputs = [
            SimpleNamespace(partition=0, offset=i, headers={}, value=orjson.dumps(d))
            for i, d in enumerate(docs)
        ]
        h.acked = {(0, i): r.value for i, r in enumerate(h.inputs)}
        kept = range(24, 120)
        h.windows["s0"] = SimpleNamespace(
            offsets=np.array(list(kept)), ts=ts[24:], values=vals[24:]
        )
        model = ModelRegistry(tiny_model_dir).load(backend="torch", device="cpu")
        idx = np.arange(47, 120)
        x_ts = np.stack([ts[i - 47 : i + 1] for i in idx])
        x_vals = np.stack([vals[i - 47 : i + 1] for i in idx])
        fc = model.predictor.predict(build_inputs(x_ts, x_vals, None, model.config))
        points = [(i, "s0", i, float(vals[i])) for i in range(120) if i != skip_update]
        want, _ = OnlineCalibrator(1, 96).calibrate_batch(points, ["s0"] * len(idx), idx, fc)
        h.outputs = []
        for r, i in enumerate(idx.tolist()):
            doc = {"series_id": "s0", "ts": float(ts[i]), "mean": [float(fc.mean[r, 0])],
                   "std": [1.0], "model_version": "v", "emitted_at": 1.0,
                   "lower": {lv: [float(want.lower[lv][r, 0])] for lv in ("80", "95")},
                   "upper": {lv: [float(want.upper[lv][r, 0])] for lv in ("80", "95")},
                   "source": {"topic": "in", "partition": 0, "offset": i}}  # fmt: skip
            h.outputs.append(
                SimpleNamespace(value=orjson.dumps(doc), headers={"calibration": "online"})
            )
        return h

    assert not check_history(history())[0]
    h = history()
    doc = orjson.loads(h.outputs[30].value)
    doc["upper"]["80"] = [doc["upper"]["80"][0] * 1.01 + 0.01]
    h.outputs[30] = SimpleNamespace(value=orjson.dumps(doc), headers={"calibration": "online"})
    assert check_history(h)[0] == {"interval_from_wrong_state": 1}
    found = check_history(history(skip_update=80))[0]
    assert set(found) == {"interval_from_wrong_state"} and found["interval_from_wrong_state"] >= 1
