"""Data sources: bad rows are counted by reason and never used; clean output shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.errors import ConfigError
from train import datasets
from train.sources import DataSettings, clean_frame, load_data, read_file, synthetic_frame


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_bad_rows_are_counted_by_reason(tmp_path: Path) -> None:
    path = _csv(
        tmp_path / "d.csv",
        "series_id,ts,value,temp,label\n"
        "a,100,1.5,20,x\n"
        "a,2026-01-01T00:00:00Z,2.5,21,x\n"  # RFC 3339 with Z
        "a,2026-01-01T01:00:00+01:00,9,21,x\n"  # same instant as the row above: duplicate
        "a,2026-01-01T02:00:00,3,21,x\n"  # no offset: refused like the worker refuses it
        "a,yesterday,3,21,x\n"
        ",300,3,21,x\n"  # no series id
        "b,300,,21,x\n"  # no value
        "b,400,abc,21,x\n"
        "b,500,nan,21,x\n"
        "b,600,-inf,21,x\n"
        "b,700,7,,x\n"  # feature missing
        "b,800,8,inf,x\n"
        "b,900,9,22,x\n"
        "b,900,10,22,x\n",  # duplicate: first kept
    )
    sf = read_file(path, features=("temp",))
    r = sf.report
    assert r.rows == 14
    assert dict(r.rejected) == {
        "invalid_ts": 2, "missing_field": 2, "invalid_value": 1, "non_finite": 3,
        "missing_feature": 1, "duplicate": 2,
    }  # fmt: skip
    assert r.accepted == 3 and r.series == 2
    assert r.rows == r.accepted + sum(r.rejected.values())
    f = sf.frame
    assert list(f.columns) == ["series_id", "ts", "value", "temp"]
    assert f.dtypes["ts"] == np.float64 and f.dtypes["value"] == np.float64
    # Sorted by series then time; the first of the duplicates was kept.
    assert f["series_id"].tolist() == ["a", "a", "b"]
    assert f["ts"].tolist() == [100.0, 1767225600.0, 900.0]
    assert f["value"].tolist() == [1.5, 2.5, 9.0]
    assert any("label" in n for n in r.notes)


def test_auto_features_take_numeric_columns_only(tmp_path: Path) -> None:
    path = _csv(tmp_path / "d.csv", "series_id,ts,value,x1,name\ns,1,1,0.5,a\ns,2,2,0.7,b\n")
    sf = read_file(path, features="auto")
    assert sf.features == ("x1",)


def test_parquet_with_datetime_column(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {
            "series_id": ["s"] * 3,
            "ts": pd.to_datetime(["2026-01-01T00:00Z", "2026-01-01T01:00Z", "2026-01-01T02:00Z"]),
            "value": [1.0, float("nan"), 3.0],
        }
    )
    path = tmp_path / "d.parquet"
    frame.to_parquet(path)
    sf = read_file(path)
    assert sf.report.rejected == {"non_finite": 1}
    assert sf.frame["ts"].tolist() == [1767225600.0, 1767232800.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("series_id,ts\ns,1\n", "lacks column"),
        ("series_id,ts,value\ns,bad,1\n,2,3\n", "no usable rows"),
    ],
)
def test_unusable_files_fail_with_a_clear_message(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        read_file(_csv(tmp_path / "d.csv", text))
    assert "--data" in str(exc.value)


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_file(tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match="extension"):
        read_file(_csv(tmp_path / "d.json", "{}"))
    with pytest.raises(ConfigError, match="--features"):
        read_file(_csv(tmp_path / "d.csv", "series_id,ts,value\ns,1,1\n"), features=("x",))


def test_synthetic_series_have_several_scales_and_seasonality() -> None:
    f = synthetic_frame(n_series=6, length=24 * 14, spacing=3600, seed=3)
    assert f["series_id"].nunique() == 6
    scales = f.groupby("series_id")["value"].std()
    assert scales.max() / scales.min() > 10  # several scales
    s = f[f["series_id"] == "synth-000"]["value"].to_numpy()
    daily = np.corrcoef(s[24:], s[:-24])[0, 1]
    assert daily > 0.5  # a daily cycle
    sf = load_data(DataSettings("synthetic://3?length=100&spacing=60&seed=1"))
    assert sf.report.series == 3 and sf.report.accepted == 300


def test_bundled_real_datasets_and_export(tmp_path: Path) -> None:
    raw = datasets.load_dataset("seattle-temps")
    sf = clean_frame(raw, "seattle-temps")
    assert sf.report.accepted == 8759 and sf.report.series == 1
    assert float(np.median(np.diff(sf.frame["ts"]))) == 3600.0
    out = tmp_path / "seattle.csv"
    assert datasets.main(["seattle-temps", "--out", str(out)]) == 0
    again = read_file(out)
    assert len(again.frame) == 8759
    np.testing.assert_allclose(again.frame["value"], sf.frame["value"])
    # The glucose log has duplicate readings: they are counted, not used.
    g = load_data(DataSettings("dataset://glucose"))
    assert g.report.rejected.get("duplicate", 0) > 0
    # The weekly CO2 record leaves 59 weeks empty: each is rejected with its reason, not filled.
    c = load_data(DataSettings("dataset://co2"))
    assert c.report.accepted == 2225 and c.report.rejected == {"non_finite": 59}
    assert float(np.median(np.diff(c.frame["ts"]))) == 7 * 86400.0
    # Half-hourly demand, 12 whole weeks from a Monday midnight UK summer time (23:00 UTC), no gap.
    t = load_data(DataSettings("dataset://taylor"))
    assert t.report.accepted == 12 * 336 and not t.report.rejected
    assert set(np.diff(t.frame["ts"])) == {1800.0}
    first = pd.Timestamp(t.frame["ts"].iloc[0], unit="s", tz="UTC").tz_convert("Europe/London")
    assert (first.day_name(), first.hour, first.minute) == ("Monday", 0, 0)
    with pytest.raises(ConfigError, match="unknown data set"):
        datasets.load_dataset("nope")
