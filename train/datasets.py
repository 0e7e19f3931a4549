"""Real time series shipped inside PyPI packages, as ``series_id, ts, value`` frames.

Nothing is downloaded: the data sit in the installed ``vega_datasets``, ``bokeh_sampledata``,
``statsmodels`` and ``pmdarima`` packages. Each loader returns the raw frame (``ts`` epoch seconds
UTC); it goes through the same cleaning as a user's file (:func:`train.sources.clean_frame`), so
duplicates and gaps in the originals (the glucose log has a few duplicates, the CO2 record empty
weeks) are counted and dropped there.

=================  ==========  =========================================================
name               spacing     content
=================  ==========  =========================================================
seattle-temps      1 h         Seattle air temperature 2010 (°F), vega_datasets
sf-temps           1 h         San Francisco air temperature 2010 (°F), vega_datasets
us-temps           1 h         both of the above, two series
sea-temp           30 min      sea surface temperature, 2016-02 … 2017-03, bokeh_sampledata
glucose            5 min       a patient's blood glucose (mg/dL) with sensor signal ``isig``
                               as a feature column, 2010-03 … 2010-10, bokeh_sampledata
co2                1 week      atmospheric CO2 at Mauna Loa (ppm), 1958-03 … 2001-12, with
                               59 missing weeks (rejected as ``non_finite``), statsmodels
taylor             30 min      electricity demand in England and Wales (MW), 2000-06-05 …
                               2000-08-27 (12 weeks): a daily and a weekly season,
                               pmdarima (Taylor 2003, from R's forecast package)
=================  ==========  =========================================================

Export one as CSV (the demo does): ``python -m train.datasets seattle-temps --out data.csv``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from model.errors import ConfigError

# The vega temperature tables are in local wall-clock time (Pacific); their single missing hour
# is the spring DST change. Converting to UTC keeps the calendar features honest.
_PACIFIC = "America/Los_Angeles"


def _epoch(index: pd.Series | pd.DatetimeIndex, tz: str | None) -> np.ndarray:
    dt = pd.DatetimeIndex(index)
    if dt.tz is None:
        dt = dt.tz_localize(tz or "UTC", ambiguous=False, nonexistent="shift_forward")
    return (dt.tz_convert("UTC") - pd.Timestamp(0, tz="UTC")).total_seconds().to_numpy()


def _vega_temps(name: str, series_id: str) -> pd.DataFrame:
    from vega_datasets import data

    df = getattr(data, name)()
    return pd.DataFrame(
        {"series_id": series_id, "ts": _epoch(df["date"], _PACIFIC), "value": df["temp"].to_numpy()}
    )


def seattle_temps() -> pd.DataFrame:
    """Hourly Seattle temperatures of 2010 (8 759 rows, one series ``seattle``)."""
    return _vega_temps("seattle_temps", "seattle")


def sf_temps() -> pd.DataFrame:
    """Hourly San Francisco temperatures of 2010 (8 759 rows, one series ``san-francisco``)."""
    return _vega_temps("sf_temps", "san-francisco")


def us_temps() -> pd.DataFrame:
    """Seattle and San Francisco hourly temperatures, two series."""
    return pd.concat([seattle_temps(), sf_temps()], ignore_index=True)


def sea_temp() -> pd.DataFrame:
    """Half-hourly sea surface temperature (19 226 rows, one series ``sea-surface``)."""
    from bokeh_sampledata.sea_surface_temperature import sea_surface_temperature as sst

    return pd.DataFrame(
        {"series_id": "sea-surface", "ts": _epoch(sst.index, None), "value": sst["temperature"]}
    ).reset_index(drop=True)


def glucose() -> pd.DataFrame:
    """5-minute blood glucose readings (52 281 rows, one series ``glucose``), with the sensor's
    raw signal ``isig`` as an optional feature column. Times have no zone: taken as UTC."""
    from bokeh_sampledata.glucose import data

    return pd.DataFrame(
        {
            "series_id": "glucose",
            "ts": _epoch(data.index, None),
            "value": data["glucose"].astype("float64").to_numpy(),
            # The log writes "nil" where the sensor gave no signal: an empty (missing) cell.
            "isig": data["isig"].astype("string").replace("nil", "").to_numpy(dtype=object),
        }
    )


def co2() -> pd.DataFrame:
    """Weekly atmospheric CO2 at Mauna Loa (2 284 rows, one series ``mauna-loa``): a rising trend
    with a yearly cycle. The weeks the original leaves empty stay empty here (NaN values), so the
    cleaning counts and drops them and the data module starts a new segment at each longer gap."""
    from statsmodels.datasets import co2 as sm_co2

    df = sm_co2.load_pandas().data  # DatetimeIndex (Saturdays, no zone), column "co2"
    return pd.DataFrame(
        {"series_id": "mauna-loa", "ts": _epoch(df.index, None), "value": df["co2"].to_numpy()}
    )


def taylor() -> pd.DataFrame:
    """Half-hourly electricity demand in England and Wales (4 032 rows, one series
    ``england-wales``), Monday 2000-06-05 00:00 to Sunday 2000-08-27 23:30 UK time (summer time
    throughout): a daily (48) and a weekly (336) season, weekends lower."""
    from pmdarima.datasets import load_taylor

    values = load_taylor()
    index = pd.date_range("2000-06-05 00:00", periods=len(values), freq="30min")
    return pd.DataFrame(
        {"series_id": "england-wales", "ts": _epoch(index, "Europe/London"), "value": values}
    )


DATASETS: dict[str, Callable[[], pd.DataFrame]] = {
    "seattle-temps": seattle_temps,
    "sf-temps": sf_temps,
    "us-temps": us_temps,
    "sea-temp": sea_temp,
    "glucose": glucose,
    "co2": co2,
    "taylor": taylor,
}


def load_dataset(name: str) -> pd.DataFrame:
    """The raw frame of bundled data set ``name``; ConfigError for an unknown name."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ConfigError(
            f"--data: unknown data set {name!r} (known: {', '.join(DATASETS)})"
        ) from None
    return loader()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.datasets", description="Export a bundled real data set as CSV."
    )
    parser.add_argument("name", choices=sorted(DATASETS))
    parser.add_argument("--out", required=True, help="CSV (or .parquet) file to write")
    args = parser.parse_args(argv)
    frame = load_dataset(args.name)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix in (".parquet", ".pq"):
        frame.to_parquet(out, index=False)
    else:
        frame.to_csv(out, index=False, float_format="%.10g")
    print(f"{out}: {len(frame)} rows, {frame['series_id'].nunique()} series")
    return 0


if __name__ == "__main__":
    sys.exit(main())
