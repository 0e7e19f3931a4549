"""Security against the real services: Kafka SASL/SCRAM, Redis ACL (+ TLS), safe model loading.

- A private Kafka broker with a SASL_PLAINTEXT listener (SCRAM-SHA-256, user ``alice``): the real
  worker authenticates through ``KafkaSettings`` and forecasts; a wrong password fails clearly.
- A private Redis with an ACL file: the project's user may touch only keys under its prefix
  (``eventcast:*`` and the hash-tagged ``{eventcast:*``) and no dangerous command; the real
  worker runs with it. When the system's redis-server is built with TLS, the same worker runs over
  ``rediss://`` with a throwaway CA made by the ``openssl`` CLI, and clients that do not trust the
  CA or speak plain TCP are refused.
- Model loading (``ModelRegistry.load``) refuses a file not in the manifest or with a wrong
  sha256, and so does the HTTP service's ``POST /reload``.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from deploy.stack import KafkaServer, RedisServer, create_topics, free_port
from model.errors import ModelLoadError
from model.registry import ModelRegistry
from stream.settings import KafkaSettings, RedisSettings
from stream.store import WindowStore, partition_for
from tests.helpers.store import sync_client
from tests.helpers.worker import ThreadWorker

T0 = 1_732_600_000.0
USER, PASSWORD = "alice", "secret"
REDIS_USER, REDIS_PASSWORD = "eventcast", "redis-s3cret"
ADMIN_PASSWORD = "admin-s3cret"


def events(n_series: int, n: int) -> list[tuple[bytes, bytes]]:
    return [
        (f"s{s}".encode(), orjson.dumps({"ts": T0 + 60.0 * i, "value": float(s + i % 5)}))
        for i in range(n)
        for s in range(n_series)
    ]


async def produce_with(
    kafka: KafkaSettings, topic: str, records: list[tuple[bytes, bytes]]
) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**kafka.client_kwargs(), acks="all")
    await producer.start()
    try:
        futs = [await producer.send(topic, key=k, value=v) for k, v in records]
        for f in futs:
            await f
    finally:
        await producer.stop()


async def consume_with(
    kafka: KafkaSettings, topic: str, expected: int, timeout: float = 60
) -> list[Any]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, **kafka.client_kwargs(), group_id=None,
                                auto_offset_reset="earliest")  # fmt: skip
    await consumer.start()
    out: list[Any] = []
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(out) < expected and loop.time() < deadline:
            for msgs in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(msgs)
        return out
    finally:
        await consumer.stop()


def worker_argv(
    bootstrap: str, redis_url: str, model_dir: Path, topic: str, *extra: str
) -> list[str]:
    return [
        "start", "--bootstrap-servers", bootstrap, "--redis-url", redis_url,
        "--model-dir", str(model_dir), "--input-topic", topic, "--output-topic", f"{topic}.out",
        "--dlq-topic", f"{topic}.dlq", "--group-id", f"g-{topic}", "--threads", "1",
        "--metrics-port", "0", *extra,
    ]  # fmt: skip


# --- Kafka SASL/SCRAM ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sasl_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    server = KafkaServer(
        tmp_path_factory.mktemp("sasl-kafka"), port=free_port(), sasl_port=free_port(),
        scram_users={USER: PASSWORD},
    )  # fmt: skip
    server.start()
    yield server
    server.stop()


def sasl_settings(server: KafkaServer, password: str = PASSWORD) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{server.sasl_port}", security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256", sasl_username=USER, sasl_password=password,
    )  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
def test_worker_authenticates_with_scram(
    sasl_kafka: KafkaServer, redis_url: str, tiny_model_dir: Path
) -> None:
    topic = "events-sasl"
    create_topics(sasl_kafka.bootstrap, {topic: 2, f"{topic}.out": 2, f"{topic}.dlq": 1})
    kafka = sasl_settings(sasl_kafka)
    asyncio.run(produce_with(kafka, topic, events(2, 50)))  # 3 forecasts per series
    w = ThreadWorker(worker_argv(
        kafka.bootstrap_servers, redis_url, tiny_model_dir, topic,
        "--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "SCRAM-SHA-256",
        "--sasl-username", USER, "--sasl-password", PASSWORD,
    )).start()  # fmt: skip
    try:
        out = asyncio.run(consume_with(kafka, f"{topic}.out", expected=6))
    finally:
        w.stop()
    assert len(out) == 6
    assert {orjson.loads(r.value)["series_id"] for r in out} == {"s0", "s1"}


@pytest.mark.integration
@pytest.mark.slow
def test_wrong_scram_password_fails_clearly(
    sasl_kafka: KafkaServer, redis_url: str, tiny_model_dir: Path, capsys: Any
) -> None:
    from aiokafka.errors import KafkaError

    from deploy.plot import kafka_failure_detail

    bad = sasl_settings(sasl_kafka, password="not-the-password")
    with pytest.raises(KafkaError):
        asyncio.run(produce_with(bad, "events-sasl", [(b"k", b"{}")]))
    # aiokafka itself only says "Unable to bootstrap"; the diagnosis names the cause.
    detail = asyncio.run(kafka_failure_detail(bad))
    assert detail is not None and "SaslAuthenticationFailed" in detail
    assert "invalid credentials" in detail
    assert asyncio.run(kafka_failure_detail(sasl_settings(sasl_kafka))) is None

    # Through the CLI: an operator sees the failed authentication, exit code 1.
    from deploy.cli import main as worker_main

    code = worker_main([
        "dlq", "replay", "--bootstrap-servers", bad.bootstrap_servers,
        "--security-protocol", "SASL_PLAINTEXT", "--sasl-mechanism", "SCRAM-SHA-256",
        "--sasl-username", USER, "--sasl-password", "not-the-password",
        "--dlq-topic", "events-sasl.dlq", "--input-topic", "events-sasl",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "authentication" in err.lower(), err


# --- Redis ACL and TLS ---------------------------------------------------------------------------

ACL = f"""\
user default on >{ADMIN_PASSWORD} ~* &* +@all
user {REDIS_USER} on >{REDIS_PASSWORD} resetkeys ~eventcast:* ~{{eventcast:* resetchannels -@all +@read +@write +@scripting +@connection +@transaction -@dangerous
"""  # noqa: E501


def acl_redis(root: Path, *tls_args: str) -> RedisServer:
    root.mkdir(parents=True, exist_ok=True)
    acl = root / "users.acl"
    acl.write_text(ACL)
    port = free_port()
    args: tuple[str, ...] = ("--aclfile", str(acl))
    if tls_args:  # TLS only: the plain port is closed
        args += ("--port", "0", "--tls-port", str(port), *tls_args)
    server = RedisServer(root, port=port, extra_args=args)
    server.start()
    return server


@pytest.mark.integration
def test_acl_user_is_limited_to_the_project_prefix(tmp_path: Path) -> None:
    import redis
    from redis.exceptions import AuthenticationError, NoPermissionError

    from stream.windows import Snapshot

    server = acl_redis(tmp_path / "redis")
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        settings = RedisSettings(
            redis_url=url, redis_username=REDIS_USER, redis_password=REDIS_PASSWORD
        )

        async def store_round_trip() -> Any:
            client = settings.client()
            try:
                store = WindowStore(client, settings.prefix, "events")
                from stream.windows import PartitionWindows  # noqa: F401 - layout owner

                p = partition_for("s1", 6)
                blob = _blob([1.0, 2.0], [T0, T0 + 60])
                await store.persist(p, Snapshot(5, T0 + 60, {"s1": blob}, []), expected=None,
                                    features=())  # fmt: skip
                await store.announce("g", "member", {"version": "v"})
                return await store.read_window("s1", 6)
            finally:
                await client.aclose()

        win = asyncio.run(store_round_trip())
        assert win is not None and win.values.tolist() == [1.0, 2.0]

        c = sync_client(settings)
        try:
            c.set("eventcast:ok", b"1")
            for op in (
                lambda: c.set("other:key", b"1"),
                lambda: c.get("session:123"),
                lambda: c.hget("{other:events:0}:win", "s1"),
                lambda: c.flushall(),
                lambda: c.keys("*"),
                lambda: c.config_get("maxmemory-policy"),
                lambda: c.eval("return redis.call('SET', KEYS[1], '1')", 1, "other:key"),
            ):
                with pytest.raises(NoPermissionError):
                    op()
        finally:
            c.close()
        with pytest.raises(AuthenticationError):
            redis.Redis(port=server.port, username=REDIS_USER, password="wrong").ping()
        admin = redis.Redis(port=server.port, password=ADMIN_PASSWORD)
        assert admin.exists("other:key") == 0 and admin.exists("eventcast:ok") == 1
        admin.close()
    finally:
        server.stop()


def _blob(values: list[float], ts: list[float]) -> bytes:
    """A window blob in the store's format, written by the store's own encoder."""
    from stream.settings import LimitSettings
    from stream.windows import PartitionWindows

    class Rec:
        def __init__(self, offset: int, t: float, v: float) -> None:
            self.offset, self.key, self.timestamp = offset, b"s1", int(t * 1000)
            self.value = orjson.dumps({"ts": t, "value": v})

    pw = PartitionWindows("events", 0, sequence_length=48, features=(), limits=LimitSettings())
    pw.apply([Rec(i, t, v) for i, (t, v) in enumerate(zip(ts, values, strict=True))], emit=False)
    return pw.snapshot(full=True).set["s1"]


def redis_has_tls() -> bool:
    exe = shutil.which("redis-server")
    if exe is None:
        return False
    out = subprocess.run(["ldd", exe], capture_output=True, text=True).stdout
    return "libssl" in out


def make_certs(d: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=eventcast test CA")  # fmt: skip
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "ext.cnf")  # fmt: skip
    run("req", "-x509", *ec, "-keyout", "other.key", "-out", "other-ca.crt", "-days", "1",
        "-subj", "/CN=some other CA")  # fmt: skip
    return {n: d / f for n, f in (("ca", "ca.crt"), ("cert", "server.crt"),
                                  ("key", "server.key"), ("other_ca", "other-ca.crt"))}  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is not installed")
@pytest.mark.skipif(not redis_has_tls(), reason="the system's redis-server is built without TLS")
def test_worker_runs_over_tls_with_the_acl_user(
    stack: Any, make_topic: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    certs = make_certs(tmp_path / "certs")
    server = acl_redis(
        tmp_path / "redis",
        "--tls-cert-file", str(certs["cert"]), "--tls-key-file", str(certs["key"]),
        "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "no",
    )  # fmt: skip
    try:
        url = f"rediss://127.0.0.1:{server.port}/0"
        # A client that does not trust the CA, and a plain-TCP client, are refused.
        with pytest.raises(RedisConnectionError):
            redis.Redis.from_url(url, username=REDIS_USER, password=REDIS_PASSWORD,
                                 ssl_ca_certs=str(certs["other_ca"])).ping()  # fmt: skip
        with pytest.raises(RedisConnectionError):
            redis.Redis(port=server.port, username=REDIS_USER, password=REDIS_PASSWORD,
                        socket_timeout=2).ping()  # fmt: skip

        topic = make_topic("events-tls", 2)
        create_topics(stack.bootstrap, {f"{topic}.out": 2, f"{topic}.dlq": 1})
        kafka = KafkaSettings(bootstrap_servers=stack.bootstrap)
        asyncio.run(produce_with(kafka, topic, events(2, 49)))  # 2 forecasts per series
        w = ThreadWorker(worker_argv(
            stack.bootstrap, url, tiny_model_dir, topic,
            "--redis-username", REDIS_USER, "--redis-password", REDIS_PASSWORD,
            "--redis-ssl-ca-certs", str(certs["ca"]),
        )).start()  # fmt: skip
        try:
            out = asyncio.run(consume_with(kafka, f"{topic}.out", expected=4))
        finally:
            w.stop()
        assert len(out) == 4
        settings = RedisSettings(
            redis_url=url,
            redis_username=REDIS_USER,
            redis_password=REDIS_PASSWORD,
            redis_ssl_ca_certs=str(certs["ca"]),
        )
        from deploy.http.state import read_window_sync

        win = read_window_sync(settings, "s1", topic=topic, partitions=2)
        assert win is not None and len(win.values) == 49
    finally:
        server.stop()


# The cluster client also reads the slot map (CLUSTER SLOTS, and CLUSTER SHARDS/NODES in newer
# redis-py) and the command table (COMMAND, in @connection): a Redis Cluster's ACL user needs those
# CLUSTER subcommands on top of the single-Redis rules (docs/operations.md, section 6).
CLUSTER_ACL = ACL.replace(
    "-@dangerous", "-@dangerous +cluster|slots +cluster|shards +cluster|nodes +cluster|info"
)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is not installed")
@pytest.mark.skipif(not redis_has_tls(), reason="the system's redis-server is built without TLS")
def test_worker_runs_on_a_tls_redis_cluster_with_the_acl_user(
    stack: Any, make_topic: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A 3+3 Redis Cluster that speaks only TLS (clients, cluster bus and replication) with the
    ACL file on every node: the worker (``--redis-cluster``, ``rediss://`` naming one node, the
    ACL user, the CA) forecasts and stores its windows; a client that does not trust the CA or
    speaks plain TCP is refused, and the ACL user cannot touch keys outside the prefix on any
    primary."""
    import redis
    from redis.cluster import RedisCluster
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import NoPermissionError, RedisClusterException

    from deploy.stack import RedisClusterServers

    certs = make_certs(tmp_path / "certs")
    root = tmp_path / "cluster"
    root.mkdir()
    (root / "users.acl").write_text(CLUSTER_ACL)
    ca = str(certs["ca"])
    cluster = RedisClusterServers.on_free_ports(
        root,
        extra_args=(
            "--aclfile", str(root / "users.acl"), "--masterauth", ADMIN_PASSWORD,
            "--port", "0", "--tls-port", "{port}", "--tls-cluster", "yes",
            "--tls-replication", "yes", "--tls-cert-file", str(certs["cert"]),
            "--tls-key-file", str(certs["key"]), "--tls-ca-cert-file", ca,
            "--tls-auth-clients", "no",
        ),
        cli_options=("--tls", "--cacert", ca, "--user", "default", "--pass", ADMIN_PASSWORD,
                     "--no-auth-warning"),
    )  # fmt: skip
    cluster.start()
    try:
        url = f"rediss://127.0.0.1:{cluster.ports[0]}/0"
        user = {"username": REDIS_USER, "password": REDIS_PASSWORD}
        with pytest.raises((RedisConnectionError, RedisClusterException)):
            RedisCluster.from_url(url, **user, ssl_ca_certs=str(certs["other_ca"])).ping()
        with pytest.raises(RedisConnectionError):
            redis.Redis(port=cluster.ports[0], **user, socket_timeout=2).ping()

        topic = make_topic("events-tls-cluster", 2)
        create_topics(stack.bootstrap, {f"{topic}.out": 2, f"{topic}.dlq": 1})
        kafka = KafkaSettings(bootstrap_servers=stack.bootstrap)
        asyncio.run(produce_with(kafka, topic, events(2, 49)))  # 2 forecasts per series
        w = ThreadWorker(worker_argv(
            stack.bootstrap, url, tiny_model_dir, topic, "--redis-cluster",
            "--redis-username", REDIS_USER, "--redis-password", REDIS_PASSWORD,
            "--redis-ssl-ca-certs", ca,
        )).start()  # fmt: skip
        try:
            out = asyncio.run(consume_with(kafka, f"{topic}.out", expected=4))
        finally:
            w.stop()
        assert len(out) == 4
        settings = RedisSettings(
            redis_url=url, redis_username=REDIS_USER, redis_password=REDIS_PASSWORD,
            redis_ssl_ca_certs=ca, redis_cluster=True,
        )  # fmt: skip
        from deploy.http.state import read_window_sync

        for sid in ("s0", "s1"):
            win = read_window_sync(settings, sid, topic=topic, partitions=2)
            assert win is not None and len(win.values) == 49, sid

        c = RedisCluster.from_url(url, **user, ssl_ca_certs=ca)
        try:
            for key in ("other:a", "other:b", "other:c", "session:1", "session:2"):
                with pytest.raises(NoPermissionError):  # on whichever primary serves the key
                    c.set(key, b"1")
            primaries = {c.get_node_from_key(k).port for k in ("other:a", "other:b", "other:c")}
            assert len(primaries) > 1  # the refusals came from more than one primary
        finally:
            c.close()
    finally:
        cluster.stop()


# --- model loading -------------------------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> tuple[ModelRegistry, Path]:
    root = tmp_path / "models"
    shutil.copytree(tiny_model_dir, root)
    reg = ModelRegistry(root)
    return reg, root / str(reg.current())


def test_loading_refuses_a_file_not_in_the_manifest(model_copy: tuple[ModelRegistry, Path]) -> None:
    import pickle

    reg, vdir = model_copy
    (vdir / "extra.pkl").write_bytes(pickle.dumps({"payload": 1}))
    with pytest.raises(ModelLoadError, match="not listed in the manifest") as exc:
        reg.load(device="cpu")
    assert exc.value.reason == "manifest"


@pytest.mark.parametrize("name", ["model.safetensors", "model.onnx", "config.json", "canary.json"])
def test_loading_refuses_a_wrong_sha256(model_copy: tuple[ModelRegistry, Path], name: str) -> None:
    reg, vdir = model_copy
    data = bytearray((vdir / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    (vdir / name).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="checksum does not match") as exc:
        reg.load(device="cpu")
    assert exc.value.reason == "checksum"


def test_reload_endpoint_keeps_serving_when_a_file_is_not_in_the_manifest(
    model_copy: tuple[ModelRegistry, Path],
) -> None:
    import warnings

    from deploy.http.app import create_app
    from deploy.http.settings import ServeSettings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    reg, vdir = model_copy
    app = create_app(ServeSettings(model_dir=reg.root, device="cpu", threads=1, reload_token="t"),
                     reg)  # fmt: skip
    with TestClient(app) as c:
        (vdir / "sneaky.onnx").write_bytes(b"\x08\x07")
        r = c.post("/reload", headers={"Authorization": "Bearer t"})
        assert r.status_code == 409 and "not listed in the manifest" in r.json()["detail"]
        assert c.get("/readyz").json()["model_version"] == vdir.name
