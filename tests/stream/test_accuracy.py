"""The worker's online accuracy (stream/accuracy.py) equals an offline join of the same forecasts
with the same actuals, whatever the batching: several rows of a series per batch, coalesced
batches (``--emit latest``), redelivered rows, a hot reload mid-stream, a shadow lane that skips
batches. (The worker end to end: tests/stream/test_online_accuracy.py.)"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from stream.accuracy import METRIC_NAMES, AccuracyMetrics, OnlineAccuracy, _Ring

T = 8  # window length of the simulation
T0 = 1_700_000_000.0


@dataclass
class Rows:
    """A WindowBatch as the accuracy join reads it."""

    series: list[str]
    ts: np.ndarray
    values: np.ndarray


def simulate(seed: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    n_series, n_events = 15, 90
    ts = {f"s{s}": T0 + np.cumsum(rng.integers(1, 4, n_events)) * 60.0 for s in range(n_series)}
    val = {sid: np.cumsum(rng.normal(size=n_events)) for sid in ts}
    fc = {  # lane -> series -> (n_events, 5) first steps: mean, lo80, up80, lo95, up95
        lane: {
            sid: np.stack(
                [val[sid] + rng.normal(scale=sc, size=n_events)] * 5, axis=1
            ) + np.array([0.0, -0.8, 0.8, -1.6, 1.6]) * rng.uniform(0.5, 1.5, (n_events, 1))
            for sid in ts
        }
        for lane, sc in (("serving", 0.4), ("shadow", 0.9))
    }  # fmt: skip
    # the input order: series interleaved at random, each series in its own order
    order = rng.permutation(np.repeat(np.arange(n_series), n_events))
    seq, nxt = [], [0] * n_series
    for s in order.tolist():
        seq.append((f"s{s}", nxt[s]))
        nxt[s] += 1
    batches, pos, prev_rows = [], 0, []
    while pos < len(seq):
        size = int(rng.integers(1, 50))
        events = seq[pos : pos + size]
        pos += size
        rows = [(sid, i) for sid, i in events if i >= T - 1]
        if rng.random() < 0.3:  # coalesced: only the newest row of each series
            newest = {sid: i for sid, i in rows}
            rows = [(sid, i) for sid, i in rows if newest[sid] == i]
        if prev_rows and rng.random() < 0.15:  # redelivered rows come first, older windows
            rows = prev_rows[-int(rng.integers(1, 6)) :] + rows
        prev_rows = rows or prev_rows
        batches.append(rows)
    return {"ts": ts, "val": val, "fc": fc, "batches": batches}


def as_rows(sim: dict, rows: list[tuple[str, int]]) -> Rows:
    ts = np.array([sim["ts"][sid][i - T + 1 : i + 1] for sid, i in rows]).reshape(-1, T)
    vals = np.array([sim["val"][sid][i - T + 1 : i + 1] for sid, i in rows]).reshape(-1, T)
    return Rows([sid for sid, _ in rows], ts, vals)


def offline(sim: dict, lane: str, made: list[tuple[str, int, str]]) -> dict[str, dict]:
    """Per version: every forecast made with a later row of its series, scored against the
    series' next event."""
    newest_row: dict[str, int] = {}
    for rows in sim["batches"]:
        for sid, i in rows:
            newest_row[sid] = max(newest_row.get(sid, -1), i)
    first = {(sid, i): version for sid, i, version in made}
    assert len(first) == len(made)
    out: dict[str, dict] = {}
    pending = 0
    for (sid, i), version in first.items():
        if newest_row[sid] <= i:
            pending += 1
            continue
        f = sim["fc"][lane][sid][i]
        actual = sim["val"][sid][i + 1]
        d = out.setdefault(version, {"err": [], "in80": 0, "in95": 0})
        d["err"].append(abs(actual - f[0]))
        d["in80"] += bool(f[1] <= actual <= f[2])
        d["in95"] += bool(f[3] <= actual <= f[4])
    out["_pending"] = {"n": pending}
    return out


def sample(text: str, name: str, version: str, extra: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'version="{version}"' in line and extra in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_online_join_equals_the_offline_computation() -> None:
    sim = simulate()
    registry = CollectorRegistry()
    acc = OnlineAccuracy(AccuracyMetrics(registry), window=100_000)
    shadow = acc.lane("shadow")
    made: dict[str, list[tuple[str, int, str]]] = {"serving": [], "shadow": []}
    rng = np.random.default_rng(11)
    half = len(sim["batches"]) // 2
    newest: dict[str, int] = {}
    for b, rows in enumerate(sim["batches"]):
        if not rows:
            continue
        # A forecast is scored once, the first time it is made: a redelivered event's repeat
        # (a row not after the newest one seen of its series) is not a new forecast.
        fresh = []
        for sid, i in rows:
            fresh.append(i > newest.get(sid, -1))
            newest[sid] = max(newest.get(sid, -1), i)
        version = "v1" if b < half else "v2"  # a hot reload mid-stream
        win = as_rows(sim, rows)
        steps = np.array([sim["fc"]["serving"][sid][i] for sid, i in rows])
        acc.serving.observe(0, win, steps, version)
        made["serving"] += [(sid, i, version) for (sid, i), f in zip(rows, fresh, strict=True) if f]
        if rng.random() < 0.2:  # the shadow failed on this batch: it made no forecast
            shadow.observe(0, win, None, "c1")
        else:
            steps = np.array([sim["fc"]["shadow"][sid][i] for sid, i in rows])
            shadow.observe(0, win, steps, "c1")
            made["shadow"] += [(sid, i, "c1") for (sid, i), f in zip(rows, fresh, strict=True) if f]
    acc.update_pending()

    text = generate_latest(registry).decode()
    pending = 0
    for lane in ("serving", "shadow"):
        want = offline(sim, lane, made[lane])
        pending += want.pop("_pending")["n"]
        assert set(want) == ({"v1", "v2"} if lane == "serving" else {"c1"})
        for version, d in want.items():
            n = len(d["err"])
            assert n > 100
            assert sample(text, "eventcast_online_scored_total", version) == n
            assert sample(text, "eventcast_online_abs_error_total", version) == pytest.approx(
                math.fsum(d["err"]), rel=1e-12
            )
            hits = sample(text, "eventcast_online_interval_hits_total", version, 'level="80"')
            assert hits == d["in80"]
            hits = sample(text, "eventcast_online_interval_hits_total", version, 'level="95"')
            assert hits == d["in95"]
            s = acc.summary(version)
            assert s.points == n
            assert s.mae == pytest.approx(math.fsum(d["err"]) / n, rel=1e-12)
            assert s.coverage == {"80": d["in80"] / n, "95": d["in95"] / n}
            assert sample(text, "eventcast_online_mae", version) == pytest.approx(s.mae)
            assert sample(text, "eventcast_online_expired_total", version) == 0
    assert acc.summary("c1").mae > acc.summary("v2").mae  # the noisier challenger shows it
    line = next(ln for ln in text.splitlines() if ln.startswith("eventcast_online_pending "))
    assert float(line.split()[1]) == pending == 2 * 15
    # every family is labelled by version (and level) only: never a series id
    for family in registry.collect():
        for smp in family.samples:
            assert set(smp.labels) <= {"version", "level"}, smp
    assert {f.name.removesuffix("_total") for f in registry.collect()} == {
        n.removesuffix("_total") for n in METRIC_NAMES
    }


def test_expired_evicted_and_dropped() -> None:
    registry = CollectorRegistry()
    acc = OnlineAccuracy(AccuracyMetrics(registry), window=10, max_series=5)
    steps = np.tile([[1.0, 0.0, 2.0, -1.0, 3.0]], (8, 1))
    ts = T0 + np.arange(T)[None, :] * 60.0 + np.zeros((8, 1))
    rows = Rows([f"s{i}" for i in range(8)], ts, np.ones((8, T)))
    acc.serving.observe(0, rows, steps, "v")
    # 8 series, at most 5 pending: the 3 least recently seen were evicted (counted as expired)
    assert acc.serving.pending == 5
    text = generate_latest(registry).decode()
    assert sample(text, "eventcast_online_expired_total", "v") == 3
    # a series whose next actual has left the window (forgotten and back): expired, not scored
    later = Rows(["s7"], ts[:1] + 10 * T * 60.0, np.ones((1, T)))
    acc.serving.observe(0, later, steps[:1], "v")
    text = generate_latest(registry).decode()
    assert sample(text, "eventcast_online_expired_total", "v") == 4
    assert sample(text, "eventcast_online_scored_total", "v") == 0
    # a revoked partition's pending forecasts are forgotten
    acc.drop(0)
    assert acc.serving.pending == 0
    assert "eventcast_online_pending 0.0" in generate_latest(registry).decode()


@pytest.mark.parametrize("chunks", [[3, 4, 5], [25], [10, 10, 10, 1], [1] * 13])
def test_ring_keeps_the_last_scores(chunks: list[int]) -> None:
    rng = np.random.default_rng(0)
    ring = _Ring(10)
    errs, hits = [], []
    for k in chunks:
        e, h = rng.random(k), rng.random((k, 2)) < 0.5
        ring.extend(e, h)
        errs.append(e)
        hits.append(h)
    e, h = np.concatenate(errs)[-10:], np.concatenate(hits)[-10:]
    s = ring.summary("v")
    assert s.points == len(e)
    assert s.mae == pytest.approx(e.mean(), rel=1e-12)
    assert s.coverage == {"80": h[:, 0].mean(), "95": h[:, 1].mean()}
