"""Training data for ``--data``: CSV/Parquet files, ``kafka://TOPIC`` replay, synthetic series.

Every source returns a :class:`SeriesFrame`: a pandas DataFrame with columns ``series_id`` (str),
``ts`` (float64 epoch seconds, UTC), ``value`` (float64) and one float64 column per feature,
sorted by series then time, one row per (series, ts) — plus a :class:`DataReport` that counts
every row that was read and every row that was refused, by reason. Bad rows are never used
silently: each is counted under exactly one reason.

Rejection reasons of files (the first one that applies, in this order):

``missing_field``   ``series_id``, ``ts`` or ``value`` is empty / null
``invalid_value``   ``value`` is not a number
``non_finite``      ``value`` (or a feature) is NaN or ±inf
``invalid_ts``      ``ts`` is neither epoch seconds nor an RFC 3339 date-time with an offset
``missing_feature`` a requested feature is empty or not a number
``duplicate``       a second row for the same (series, ts); the first one in file order is kept

A Kafka replay uses the worker's own decoder (:func:`stream.decode.decode_event`) so its
rejection reasons are the dead-letter reasons of docs/contract.md (see :mod:`train.replay`).
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.errors import ConfigError

log = logging.getLogger(__name__)

REQUIRED = ("series_id", "ts", "value")
# RFC 3339 requires an offset (or Z) after the time; a string without one is refused, as the worker
# refuses such events.
_RFC3339_OFFSET = re.compile(r"(?:[zZ]|[+-]\d{2}:?\d{2})$")
_NAN_WORDS = {"nan", "inf", "infinity"}

FeatureSpec = Sequence[str] | str  # names, or "auto" (every numeric extra column)


@dataclass
class DataReport:
    """What a source read: rows seen, rows accepted, rows refused by reason, series kept."""

    source: str
    rows: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    series: int = 0
    features: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    def reject(self, reason: str, n: int = 1) -> None:
        if n:
            self.rejected[reason] += int(n)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows": self.rows,
            "accepted": self.accepted,
            "rejected": dict(sorted(self.rejected.items())),
            "series": self.series,
            "features": list(self.features),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        bad = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items())) or "none"
        return (
            f"{self.source}: {self.rows} rows, {self.accepted} accepted in {self.series} series, "
            f"rejected: {bad}"
        )


@dataclass
class SeriesFrame:
    """A clean, sorted table of observations and the report of how it was obtained."""

    frame: pd.DataFrame
    report: DataReport

    @property
    def features(self) -> tuple[str, ...]:
        return self.report.features


# ---- cleaning (shared by every source) ---------------------------------------------------------


def _numeric(col: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values float64, missing mask, unparsable mask)`` of a column of any dtype.

    Empty strings and nulls are *missing*; text that is not a number is *unparsable*;
    ``nan``/``inf`` spelled out parse (to non-finite numbers, reported by the caller).
    """
    if pd.api.types.is_bool_dtype(col):
        n = len(col)
        return np.full(n, np.nan), np.zeros(n, bool), np.ones(n, bool)
    if pd.api.types.is_numeric_dtype(col):
        missing = col.isna().to_numpy()
        # A float NaN in a typed column is a null for pandas; Parquet keeps NaN and null apart,
        # but after conversion both are NaN, so report them as non-finite, not missing.
        if pd.api.types.is_float_dtype(col) and not isinstance(
            col.dtype, pd.api.extensions.ExtensionDtype
        ):
            missing = np.zeros(len(col), bool)
        vals = pd.to_numeric(col, errors="coerce").astype("float64").to_numpy(na_value=np.nan)
        return vals, missing, np.zeros(len(col), bool)
    text = col.astype("string").str.strip()
    missing = (text.isna() | (text == "")).to_numpy(dtype=bool)
    vals = pd.to_numeric(text.where(~pd.Series(missing, index=col.index)), errors="coerce")
    vals = vals.astype("float64").to_numpy(na_value=np.nan)
    spelled_nan = text.str.lower().str.lstrip("+-").isin(_NAN_WORDS).to_numpy(dtype=bool)
    unparsable = np.isnan(vals) & ~missing & ~spelled_nan
    return vals, missing, unparsable


def parse_times(col: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(epoch seconds float64, missing mask, invalid mask)`` for a ``ts`` column.

    Accepts epoch seconds (numbers or numeric text) and RFC 3339 strings with an offset or ``Z``;
    a timezone-aware datetime column is converted to UTC, a naive one is taken as UTC (and the
    caller notes it). Strings without an offset and unparsable text are *invalid*.
    """
    n = len(col)
    if isinstance(col.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(col):
        missing = col.isna().to_numpy()
        dt = col if isinstance(col.dtype, pd.DatetimeTZDtype) else col.dt.tz_localize("UTC")
        secs = (dt.dt.tz_convert("UTC") - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
        return secs.to_numpy(dtype="float64", na_value=np.nan), missing, np.zeros(n, bool)
    nums, missing, unparsable = _numeric(col)
    nums = nums.copy()  # pandas may hand out read-only views (copy-on-write)
    invalid = np.zeros(n, bool)
    # Numbers that parsed but are not finite are invalid times.
    invalid |= ~missing & ~unparsable & ~np.isfinite(nums)
    if unparsable.any():
        text = col.astype("string").str.strip()[unparsable]
        has_offset = text.str.contains(_RFC3339_OFFSET, regex=True).fillna(False).to_numpy(bool)
        looks_datetime = text.str.len().fillna(0).to_numpy() >= 19
        parsed = pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")
        secs = (
            (parsed - pd.Timestamp(0, tz="UTC"))
            .dt.total_seconds()
            .to_numpy(dtype="float64", na_value=np.nan)
        )
        ok = has_offset & looks_datetime & np.isfinite(secs)
        idx = np.flatnonzero(unparsable)
        nums[idx[ok]] = secs[ok]
        invalid[idx[~ok]] = True
    return nums, missing, invalid


def clean_frame(
    raw: pd.DataFrame, source: str, features: FeatureSpec = (), report: DataReport | None = None
) -> SeriesFrame:
    """Validate and normalise a raw table (any column dtypes) into a :class:`SeriesFrame`.

    ``features``: names of extra columns to keep as features (each must exist), or ``"auto"``
    for every extra column whose non-empty cells are all numbers.

    Raises ConfigError (naming ``--data`` or ``--features``) when a required column or a
    requested feature column is missing, or when no row is usable.
    """
    report = report or DataReport(source)
    cols = {str(c).strip(): c for c in raw.columns}
    lacking = [c for c in REQUIRED if c not in cols]
    if lacking:
        raise ConfigError(
            f"--data: {source} lacks column(s) {', '.join(lacking)} "
            f"(expected series_id, ts, value; found {', '.join(map(str, raw.columns)) or 'none'})"
        )
    extra = [c for c in cols if c not in REQUIRED]
    if isinstance(features, str):
        if features != "auto":
            raise ConfigError(f"--features: expected 'auto' or a list of names, got {features!r}")
        chosen: list[str] = []
        for c in extra:
            _, miss, bad = _numeric(raw[cols[c]])
            if not bad.any() and not miss.all():
                chosen.append(c)
            else:
                report.notes.append(f"column {c!r} is not numeric: not used as a feature")
    else:
        chosen = list(features)
        missing_cols = [c for c in chosen if c not in cols]
        if missing_cols:
            raise ConfigError(
                f"--features: {source} has no column(s) {', '.join(missing_cols)} "
                f"(extra columns: {', '.join(extra) or 'none'})"
            )
    unused = [c for c in extra if c not in chosen]
    if unused and not isinstance(features, str):
        report.notes.append(f"extra columns not used as features: {', '.join(unused)}")

    n = len(raw)
    report.rows += n
    bad = np.zeros(n, bool)

    def take(mask: np.ndarray, reason: str) -> None:
        nonlocal bad
        new = mask & ~bad
        report.reject(reason, int(new.sum()))
        bad |= new

    sid = raw[cols["series_id"]].astype("string").str.strip()
    sid_missing = (sid.isna() | (sid == "")).to_numpy(bool)
    values, v_missing, v_unparsable = _numeric(raw[cols["value"]])
    ts, t_missing, t_invalid = parse_times(raw[cols["ts"]])
    if pd.api.types.is_datetime64_any_dtype(raw[cols["ts"]]) and not isinstance(
        raw[cols["ts"]].dtype, pd.DatetimeTZDtype
    ):
        report.notes.append("ts column has no time zone: taken as UTC")

    take(sid_missing | v_missing | t_missing, "missing_field")
    take(v_unparsable, "invalid_value")
    take(~np.isfinite(values) & ~v_missing & ~v_unparsable, "non_finite")
    take(t_invalid, "invalid_ts")
    feats: dict[str, np.ndarray] = {}
    for name in chosen:
        fv, f_missing, f_bad = _numeric(raw[cols[name]])
        take(f_missing | f_bad, "missing_feature")
        take(~np.isfinite(fv), "non_finite")
        feats[name] = fv

    keep = ~bad
    out = pd.DataFrame(
        {
            "series_id": sid.to_numpy(dtype=object, na_value="")[keep].astype(str),
            "ts": ts[keep],
            "value": values[keep],
            **{name: col[keep] for name, col in feats.items()},
        }
    )
    # Stable sort keeps file order among equal (series, ts), so "first one wins" for duplicates.
    out = out.sort_values(["series_id", "ts"], kind="stable")
    dup = out.duplicated(["series_id", "ts"], keep="first").to_numpy()
    report.reject("duplicate", int(dup.sum()))
    out = out[~dup].reset_index(drop=True)
    report.accepted += len(out)
    report.series = int(out["series_id"].nunique())
    report.features = tuple(chosen)
    if len(out) == 0:
        raise ConfigError(f"--data: {source} holds no usable rows ({report.summary()})")
    return SeriesFrame(out, report)


# ---- files ------------------------------------------------------------------------------------


def read_file(path: Path | str, features: FeatureSpec = ()) -> SeriesFrame:
    """Read a CSV (``.csv``, ``.csv.gz``, ``.txt``) or Parquet (``.parquet``, ``.pq``) file.

    CSV cells are read as text and parsed here, so ``""`` (missing), ``abc`` (invalid) and
    ``nan`` (non-finite) are told apart. Raises ConfigError naming ``--data`` when the file cannot
    be read, has an unknown extension, lacks a column, or holds no usable row.
    """
    p = Path(path)
    name = p.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            raw = pd.read_parquet(p)
        elif name.endswith((".csv", ".csv.gz", ".txt", ".tsv")):
            sep = "\t" if name.endswith(".tsv") else ","
            raw = pd.read_csv(p, dtype=str, keep_default_na=False, sep=sep)
        else:
            raise ConfigError(
                f"--data: {p} has an unknown extension (use .csv, .parquet or kafka://TOPIC)"
            )
    except FileNotFoundError as exc:
        raise ConfigError(f"--data: {p} does not exist") from exc
    except ConfigError:
        raise
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise ConfigError(f"--data: cannot read {p}: {exc}") from exc
    return clean_frame(raw, str(p), features)


# ---- synthetic series -------------------------------------------------------------------------


def synthetic_frame(
    n_series: int = 8,
    length: int = 2000,
    spacing: float = 3600.0,
    seed: int = 0,
    start: float = 1_700_000_000.0,
) -> pd.DataFrame:
    """Realistic synthetic series for demos: each has its own scale (0.5 … 5000), level, linear
    trend, daily and weekly seasonality (with a second harmonic), AR(1) noise and rare spikes.

    Returns a frame with ``series_id, ts, value`` (``ts`` on a grid of ``spacing`` seconds).
    Raises ConfigError for non-positive sizes.
    """
    if n_series < 1 or length < 2 or spacing <= 0:
        raise ConfigError(
            f"--data synthetic: need series >= 1, length >= 2, spacing > 0 "
            f"(got {n_series}, {length}, {spacing})"
        )
    rng = np.random.default_rng(seed)
    t = start - start % 86_400 + np.arange(length) * spacing  # (L,) starts at midnight UTC
    day = 2 * np.pi * (t % 86_400) / 86_400
    week = 2 * np.pi * (t % (7 * 86_400)) / (7 * 86_400)
    frames = []
    for i in range(n_series):
        scale = float(np.exp(rng.uniform(np.log(0.5), np.log(5000))))
        level = scale * rng.uniform(2, 10)
        trend = scale * rng.normal(0, 0.5) / max(length, 1)
        a_day, a_week = scale * rng.uniform(0.3, 2.0), scale * rng.uniform(0.0, 1.0)
        phase = rng.uniform(0, 2 * np.pi, 3)
        phi, sigma = rng.uniform(0.5, 0.9), scale * rng.uniform(0.05, 0.3)
        noise = np.empty(length)
        eps = rng.normal(0, sigma, length)
        noise[0] = eps[0]
        for k in range(1, length):  # AR(1): a loop is fine at demo sizes
            noise[k] = phi * noise[k - 1] + eps[k]
        spikes = (rng.random(length) < 0.002) * rng.normal(0, 4 * sigma, length)
        y = (
            level
            + trend * np.arange(length)
            + a_day * np.sin(day + phase[0])
            + 0.3 * a_day * np.sin(2 * day + phase[1])
            + a_week * np.sin(week + phase[2])
            + noise
            + spikes
        )
        frames.append(pd.DataFrame({"series_id": f"synth-{i:03d}", "ts": t, "value": y}))
    return pd.concat(frames, ignore_index=True)


def parse_synthetic_uri(uri: str) -> dict[str, Any]:
    """``synthetic://[N][?length=L&spacing=S&seed=X]`` -> keyword arguments of synthetic_frame."""
    parsed = urllib.parse.urlparse(uri)
    kwargs: dict[str, Any] = {}
    try:
        if parsed.netloc:
            kwargs["n_series"] = int(parsed.netloc)
        for key, vals in urllib.parse.parse_qs(parsed.query).items():
            if key == "length":
                kwargs["length"] = int(vals[-1])
            elif key == "spacing":
                kwargs["spacing"] = float(vals[-1])
            elif key == "seed":
                kwargs["seed"] = int(vals[-1])
            elif key == "series":
                kwargs["n_series"] = int(vals[-1])
            else:
                raise ConfigError(f"--data: unknown synthetic parameter {key!r}")
    except ValueError as exc:
        raise ConfigError(f"--data: bad synthetic URI {uri!r}: {exc}") from exc
    return kwargs


# ---- dispatch ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSettings:
    """What ``--data`` names and how to read it (built once from the flags)."""

    uri: str
    features: FeatureSpec = ()
    since: float | None = None  # kafka:// replay bounds (epoch seconds, broker timestamps)
    until: float | None = None
    max_event_bytes: int = 65536
    kafka: Any = None  # stream.settings.KafkaSettings for kafka:// sources


def load_data(settings: DataSettings) -> SeriesFrame:
    """Read the source ``settings.uri`` names: a file path, ``kafka://TOPIC``,
    ``synthetic://...`` or ``dataset://NAME`` (a bundled real data set, see train.datasets).

    Raises ConfigError for an unusable source (message names ``--data``), EventcastError for a
    broker that cannot be reached.
    """
    uri = settings.uri
    if not uri:
        raise ConfigError("--data: required (a CSV/Parquet file, kafka://TOPIC or synthetic://)")
    if uri.startswith("kafka://"):
        from train.replay import replay_topic

        return replay_topic(settings)
    if uri.startswith("synthetic://"):
        raw = synthetic_frame(**parse_synthetic_uri(uri))
        return clean_frame(raw, uri, settings.features)
    if uri.startswith("dataset://"):
        from train.datasets import load_dataset

        raw = load_dataset(uri[len("dataset://") :])
        return clean_frame(raw, uri, settings.features)
    if "://" in uri:
        raise ConfigError(f"--data: unsupported URI scheme in {uri!r}")
    return read_file(uri, settings.features)
