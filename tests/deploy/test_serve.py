"""The HTTP service: every endpoint, the body limit, bad inputs, and property-based validation.

The app runs in-process (FastAPI's TestClient) on the real tiny model of ``tiny_model_dir``,
loaded through ``ModelRegistry``; the body-limit test for chunked uploads also goes through a
real uvicorn socket. Series state comes from an in-memory window reader here (the Redis-backed
reader is tested in ``test_view.py`` against the real Redis).
"""

from __future__ import annotations

import math
import shutil
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.http.app import create_app
from deploy.http.bodies import validate_predict
from deploy.http.errors import RequestInvalid
from deploy.http.feed import ForecastHistory
from deploy.http.settings import ServeSettings
from deploy.http.state import Window
from model.config import ModelConfig
from model.features import build_inputs
from model.registry import ModelRegistry
from tests.helpers.http import serve_in_thread

with warnings.catch_warnings():
    # starlette's TestClient warns at import that httpx will be replaced by httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

T = 48
TOKEN = "reload-token-for-tests"
LIMIT = 8192
T0 = 1_732_600_000.0


def window_body(
    n: int = T, series_id: str = "s1", step: float = 300.0, **extra: Any
) -> dict[str, Any]:
    ts = [T0 + i * step for i in range(n)]
    values = [10.0 + math.sin(i / 4.0) for i in range(n)]
    return {"series_id": series_id, "ts": ts, "values": values, **extra}


class MemoryWindows:
    def __init__(self) -> None:
        self.windows: dict[str, Window] = {}

    async def __call__(self, series_id: str) -> Window | None:
        return self.windows.get(series_id)


@pytest.fixture
def windows() -> MemoryWindows:
    return MemoryWindows()


@pytest.fixture
def make_client(tiny_model_dir: Path, windows: MemoryWindows) -> Iterator[Any]:
    clients: list[TestClient] = []

    def make(model_dir: Path | None = None, **kw: Any) -> TestClient:
        root = model_dir or tiny_model_dir
        settings_kw = {
            "model_dir": root,
            "reload_token": TOKEN,
            "max_body_bytes": LIMIT,
            "device": "cpu",
            "threads": 1,
        }
        settings_kw.update(kw.pop("settings", {}))
        app = create_app(
            ServeSettings(**settings_kw),
            ModelRegistry(root),
            window_reader=kw.pop("window_reader", windows),
            **kw,
        )
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Any) -> TestClient:
    return make_client()


# --- POST /predict -------------------------------------------------------------------------------


def test_predict_returns_the_forecast_object(client: TestClient, tiny_model_dir: Path) -> None:
    body = window_body()
    r = client.post("/predict", json=body)
    assert r.status_code == 200, r.text
    f = r.json()
    loaded = ModelRegistry(tiny_model_dir).load(device="cpu")
    h = loaded.config.horizon
    assert f["schema_version"] == 1
    assert f["series_id"] == "s1"
    assert f["model_version"] == ModelRegistry(tiny_model_dir).current()
    assert f["ts"] == body["ts"][-1]
    assert f["horizon"] == h
    assert f["target_ts"] == [body["ts"][-1] + 300.0 * (k + 1) for k in range(h)]
    assert "source" not in f
    for k in range(h):
        assert f["std"][k] > 0
        assert f["lower"]["95"][k] <= f["lower"]["80"][k] <= f["mean"][k]
        assert f["mean"][k] <= f["upper"]["80"][k] <= f["upper"]["95"][k]
    # The same numbers as the model computes directly (float32 outputs widened).
    x = build_inputs(np.array([body["ts"]]), np.array([body["values"]]), None, loaded.config)
    direct = loaded.predictor.predict(x)
    assert f["mean"] == pytest.approx(direct.mean[0].tolist(), rel=1e-5)
    assert f["upper"]["95"] == pytest.approx(direct.upper["95"][0].tolist(), rel=1e-5)


def test_predict_accepts_rfc3339_times_with_offsets(client: TestClient) -> None:
    numeric = window_body()
    texts = window_body()
    texts["ts"] = [
        # alternate Z and +01:00 spellings of the same instants
        (f"{_iso(t)}Z" if i % 2 else _iso(t + 3600) + "+01:00")
        for i, t in enumerate(numeric["ts"])
    ]
    a = client.post("/predict", json=numeric).json()
    b = client.post("/predict", json=texts).json()
    assert a["ts"] == b["ts"] and a["mean"] == b["mean"]


def _iso(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def detail(r: Any) -> list[dict[str, Any]]:
    assert r.status_code == 422, r.text
    return r.json()["detail"]


def test_predict_rejects_wrong_lengths(client: TestClient) -> None:
    d = detail(client.post("/predict", json=window_body(n=47)))
    msgs = {tuple(e["loc"]): e["msg"] for e in d}
    assert "exactly 48 timestamps" in msgs[("body", "ts")]
    assert "exactly 48 numbers" in msgs[("body", "values")]
    body = window_body()
    body["values"].append(1.0)
    d = detail(client.post("/predict", json=body))
    assert d[0]["loc"] == ["body", "values"] and "got 49" in d[0]["msg"]


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_predict_rejects_non_standard_and_non_finite_numbers(
    client: TestClient, literal: bytes
) -> None:
    raw = orjson.dumps(window_body()).replace(b"10.0,", literal + b",", 1)
    assert literal in raw
    d = detail(client.post("/predict", content=raw, headers={"content-type": "application/json"}))
    assert d[0]["type"] == "json_invalid" and "not valid JSON" in d[0]["msg"]


def test_predict_rejects_bad_values_naming_each(client: TestClient) -> None:
    body = window_body()
    body["values"][3] = None
    body["values"][5] = "1.5"
    body["values"][7] = True
    body["values"][9] = 1e39  # finite in JSON, but not in the model's float32
    d = detail(client.post("/predict", json=body))
    locs = {tuple(e["loc"]): e for e in d}
    assert locs[("body", "values", 3)]["msg"] == "expected a number, got null"
    assert locs[("body", "values", 5)]["msg"] == "expected a number, got str"
    assert locs[("body", "values", 7)]["msg"] == "expected a number, got a boolean"
    assert "float32" in locs[("body", "values", 9)]["msg"]


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("2024-11-26T10:00:00", "no UTC offset"),
        ("yesterday", "not an RFC 3339"),
        ("2024-13-40T10:00:00Z", "not an RFC 3339"),
        (True, "got bool"),
        (None, "NoneType"),
    ],
)
def test_predict_rejects_unparsable_times(client: TestClient, bad: Any, needle: str) -> None:
    body = window_body()
    body["ts"][10] = bad
    d = detail(client.post("/predict", json=body))
    assert d[0]["loc"] == ["body", "ts", 10] and needle in d[0]["msg"], d


def test_predict_rejects_times_out_of_order(client: TestClient) -> None:
    body = window_body()
    body["ts"][20] = body["ts"][19]
    d = detail(client.post("/predict", json=body))
    assert d[0]["loc"] == ["body", "ts", 20] and "strictly increasing" in d[0]["msg"]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (b"[1, 2]", ["body"]),
        (b"{}", ["body", "series_id"]),
        (b"not json", ["body"]),
        (b"\xff\xfe", ["body"]),
        (b"", ["body"]),
    ],
)
def test_predict_rejects_malformed_bodies(client: TestClient, body: bytes, loc: list[str]) -> None:
    d = detail(client.post("/predict", content=body, headers={"content-type": "application/json"}))
    assert d[0]["loc"] == loc


def test_missing_feature_is_named() -> None:
    cfg = ModelConfig(features=("temp", "load"))
    body = window_body(features={"temp": [1.0] * T, "other": [2.0]})
    with pytest.raises(RequestInvalid) as exc:
        validate_predict(body, cfg)
    assert exc.value.errors == [
        {
            "loc": ["body", "features", "load"],
            "type": "missing_feature",
            "msg": "missing feature 'load' the model was trained with",
        }
    ]
    body["features"]["load"] = [0.5] * T
    ok = validate_predict(body, cfg)
    assert set(ok.features) == {"temp", "load"}  # "other" dropped


# --- body limit ----------------------------------------------------------------------------------


def big_body() -> bytes:
    body = window_body()
    body["pad"] = "x" * (2 * LIMIT)
    return orjson.dumps(body)


def test_body_over_limit_with_content_length_is_413(client: TestClient) -> None:
    r = client.post("/predict", content=big_body(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and f"limit of {LIMIT} bytes" in r.json()["detail"]
    # also on routes that never read a body
    assert client.post("/reload", content=big_body()).status_code == 413


def test_body_at_limit_is_accepted(client: TestClient) -> None:
    raw = orjson.dumps(window_body())
    raw = raw[:-1] + b',"pad":"' + b"x" * (LIMIT - len(raw) - 9) + b'"}'
    assert len(raw) == LIMIT
    assert client.post("/predict", content=raw).status_code == 200


def test_chunked_body_over_limit_is_413_in_process(client: TestClient) -> None:
    data = big_body()
    chunks = iter([data[i : i + 1000] for i in range(0, len(data), 1000)])
    r = client.post("/predict", content=chunks)  # a generator: no Content-Length, chunked
    assert r.status_code == 413


def test_chunked_body_over_limit_is_413_over_a_real_socket(tiny_model_dir: Path) -> None:
    app = create_app(
        ServeSettings(model_dir=tiny_model_dir, max_body_bytes=LIMIT, device="cpu"),
        ModelRegistry(tiny_model_dir),
    )
    with serve_in_thread(app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            # Far more than the limit, in chunks; the server must answer without reading it all.
            chunk = b"x" * 4096
            try:
                for _ in range(64):
                    s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may close once it has answered
            head = s.recv(200)
    assert head.startswith(b"HTTP/1.1 413"), head


# --- health, readiness, metrics, OpenAPI ---------------------------------------------------------


def test_healthz_and_readyz(make_client: Any) -> None:
    c = make_client()
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_readyz_503_when_redis_does_not_answer(make_client: Any) -> None:
    async def down() -> bool:
        raise ConnectionError("refused")

    r = make_client(redis_ping=down).get("/readyz")
    assert r.status_code == 503 and r.json()["problems"] == ["Redis does not answer"]


def test_readyz_503_and_predict_503_without_a_model(make_client: Any) -> None:
    c = make_client(load_on_start=False)
    r = c.get("/readyz")
    assert r.status_code == 503 and "no model loaded" in r.json()["problems"]
    assert c.post("/predict", json=window_body()).status_code == 503


def test_metrics_count_requests_predictions_and_version(
    client: TestClient, tiny_model_dir: Path
) -> None:
    client.post("/predict", json=window_body())
    client.post("/predict", json=window_body(n=3))
    text = client.get("/metrics").text
    version = ModelRegistry(tiny_model_dir).current()
    assert "eventcast_http_predictions_total 1.0" in text
    assert f'eventcast_serve_model_info{{version="{version}"}} 1.0' in text
    assert 'eventcast_http_requests_total{method="POST",route="/predict",status="422"} 1.0' in text
    assert 'eventcast_http_rejected_total{reason="invalid"} 1.0' in text
    assert "eventcast_http_request_duration_seconds_bucket" in text


def test_openapi_spec_documents_every_endpoint(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for path in (
        "/predict",
        "/series/{series_id}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/reload",
        "/",
    ):
        assert path in spec["paths"], path
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert {"series_id", "ts", "values"} <= set(body["schema"]["properties"])
    assert {"200", "413", "422"} <= set(spec["paths"]["/predict"]["post"]["responses"])


def test_reload_is_documented_as_bearer_protected(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["paths"]["/reload"]["post"]["security"] == [{"HTTPBearer": []}]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


# --- GET /series/{id} ----------------------------------------------------------------------------


def test_series_returns_window_and_computed_forecast(
    client: TestClient, windows: MemoryWindows
) -> None:
    b = window_body(series_id="w1")
    windows.windows["w1"] = Window("w1", b["ts"], b["values"])
    r = client.get("/series/w1")
    assert r.status_code == 200
    got = r.json()
    assert got["window"]["values"] == b["values"]
    assert got["forecast_origin"] == "computed"
    # the same forecast POST /predict gives for that window
    direct = client.post("/predict", json=b).json()
    assert got["forecast"]["mean"] == direct["mean"]


def test_series_prefers_the_topic_forecast(make_client: Any, windows: MemoryWindows) -> None:
    history = ForecastHistory()
    c = make_client(history=history)
    b = window_body(series_id="w2")
    windows.windows["w2"] = Window("w2", b["ts"][:10], b["values"][:10])  # warming: no forecast
    assert c.get("/series/w2").json()["forecast"] is None
    fc = c.post("/predict", json=window_body(series_id="w2")).json()
    history.add(fc)
    got = c.get("/series/w2").json()
    assert got["forecast_origin"] == "topic" and got["forecast"] == fc
    assert got["forecasts"] == [fc]


def test_series_unknown_is_404_and_without_redis_503(make_client: Any) -> None:
    assert make_client().get("/series/nope").status_code == 404
    r = make_client(window_reader=None).get("/series/nope")
    assert r.status_code == 503 and "--redis-url" in r.json()["detail"]


# --- POST /reload --------------------------------------------------------------------------------


def test_reload_is_disabled_without_a_token(make_client: Any) -> None:
    c = make_client(settings={"reload_token": None})
    r = c.post("/reload", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 503 and "EVENTCAST_RELOAD_TOKEN" in r.json()["detail"]


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer wrong",
        f"Basic {TOKEN}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
    ],
)
def test_reload_refuses_missing_or_wrong_tokens(client: TestClient, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    r = client.post("/reload", headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")


def test_reload_swaps_to_a_new_version_and_refuses_a_bad_one(
    make_client: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tests.helpers.tiny_model import make_tiny_model_dir

    root = tmp_path / "models"
    shutil.copytree(tiny_model_dir, root)
    c = make_client(model_dir=root)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    old = ModelRegistry(root).current()
    r = c.post("/reload", headers=auth)
    assert r.status_code == 200 and r.json() == {"previous": old, "version": old, "changed": False}

    new = make_tiny_model_dir(root, seed=1)
    r = c.post("/reload", headers=auth)
    assert r.json() == {"previous": old, "version": new, "changed": True}
    assert c.post("/predict", json=window_body()).json()["model_version"] == new

    # A promoted version whose weights no longer match the manifest is refused; `new` keeps serving.
    bad = make_tiny_model_dir(root, seed=2)
    weights = root / bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    r = c.post("/reload", headers=auth)
    assert r.status_code == 409 and f"still serving {new}" in r.json()["detail"]
    assert c.post("/predict", json=window_body()).json()["model_version"] == new
    assert 'eventcast_serve_reloads_total{outcome="refused"} 1.0' in c.get("/metrics").text


# --- property-based validation -------------------------------------------------------------------

CFG = ModelConfig(hidden_size=8, num_layers=1, attention_heads=1)
finite = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, allow_infinity=False)
json_scalar = st.none() | st.booleans() | st.integers() | finite | st.text(max_size=5)
json_value = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def valid_windows(draw: st.DrawFn) -> dict[str, Any]:
    start = draw(st.floats(min_value=0, max_value=4e9, allow_nan=False))
    gaps = draw(st.lists(st.floats(min_value=0.5, max_value=1e5), min_size=T - 1, max_size=T - 1))
    ts = [start]
    for g in gaps:
        ts.append(ts[-1] + g)
    values = draw(st.lists(finite, min_size=T, max_size=T))
    sid = draw(st.text(min_size=1, max_size=256))
    return {"series_id": sid, "ts": ts, "values": values}


@given(
    obj=json_value
    | st.dictionaries(st.sampled_from(["series_id", "ts", "values", "features"]), json_value)
)
@settings(max_examples=300, deadline=None)
def test_validation_never_fails_with_anything_but_request_invalid(obj: Any) -> None:
    try:
        validate_predict(obj, CFG)
    except RequestInvalid as exc:
        assert exc.errors and all({"loc", "msg", "type"} == set(e) for e in exc.errors)
        assert all(e["loc"][0] == "body" and e["msg"] for e in exc.errors)


@given(body=valid_windows())
@settings(max_examples=200, deadline=None)
def test_valid_windows_are_accepted_unchanged(body: dict[str, Any]) -> None:
    got = validate_predict(body, CFG)
    assert got.series_id == body["series_id"]
    assert got.ts.tolist() == body["ts"] and got.values.tolist() == body["values"]


@given(
    body=valid_windows(),
    where=st.integers(0, T - 1),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    field=st.sampled_from(["ts", "values"]),
)
@settings(max_examples=200, deadline=None)
def test_any_non_finite_number_is_rejected_at_its_index(
    body: dict[str, Any], where: int, bad: float, field: str
) -> None:
    body[field][where] = bad
    with pytest.raises(RequestInvalid) as exc:
        validate_predict(body, CFG)
    assert ["body", field, where] in [e["loc"] for e in exc.value.errors]


@given(
    body=valid_windows(),
    n=st.integers(0, 200).filter(lambda n: n != T),
    field=st.sampled_from(["ts", "values"]),
)
@settings(max_examples=100, deadline=None)
def test_any_wrong_length_is_rejected(body: dict[str, Any], n: int, field: str) -> None:
    body[field] = (body[field] * 5)[:n]
    with pytest.raises(RequestInvalid) as exc:
        validate_predict(body, CFG)
    assert any(e["loc"] == ["body", field] and f"got {n}" in e["msg"] for e in exc.value.errors)


@given(body=valid_windows())
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_endpoint_answers_valid_windows_with_a_finite_forecast_or_a_clear_422(
    client: TestClient, body: dict[str, Any]
) -> None:
    r = client.post("/predict", json=body)
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        f = r.json()
        assert all(math.isfinite(v) for v in f["mean"]) and all(s > 0 for s in f["std"])
    else:  # only the model's own float32 limits may refuse a valid window
        assert r.json()["detail"][0]["type"] == "non_finite_output"


def test_a_window_the_model_cannot_handle_gets_a_422_not_nulls(client: TestClient) -> None:
    # Found by hypothesis: within float32 range, but its variance overflows float32 in the model.
    body = {
        "series_id": "0",
        "ts": [float(i) for i in range(T)],
        "values": [0.0] * (T - 1) + [1.8641952467616535e19],
    }
    r = client.post("/predict", json=body)
    if r.status_code == 200:  # a model that handles it must return numbers, not nulls
        assert all(isinstance(v, float) for v in r.json()["mean"])
    else:
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "non_finite_output"


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["serve", "--help"],
        ["plot", "--help"],
        ["dlq", "replay", "--help"],
        ["series", "delete", "--help"],
    ],
)
def test_command_help_renders(argv: list[str], capsys: Any) -> None:
    from deploy.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 0 and "usage: worker" in capsys.readouterr().out


def test_serve_flags_and_environment_build_the_settings(tiny_model_dir: Path) -> None:
    from deploy.cli import settings as cli_settings
    from model.errors import ConfigError

    env = {"EVENTCAST_MODEL_DIR": str(tiny_model_dir), "EVENTCAST_RELOAD_TOKEN": "t0k"}
    s = cli_settings(["serve", "--port", "8123", "--max-body-bytes", "100"], environ=env)
    assert (s.model_dir, s.port, s.max_body_bytes, s.reload_token) == (
        tiny_model_dir,
        8123,
        100,
        "t0k",
    )
    assert "t0k" not in repr(s)  # the token never reaches logs
    assert s.redis_url is None and s.bootstrap_servers is None  # both optional
    with pytest.raises(ConfigError, match="--model-dir"):
        cli_settings(["serve"], environ={})
    with pytest.raises(ConfigError, match="--max-body-bytes"):
        cli_settings(["serve", "--max-body-bytes", "0"], environ=env)
