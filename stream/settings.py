"""Settings of the streaming worker and of the connections every command shares.

Each setting is one field (``stream.config``: the field is the flag, the ``EVENTCAST_*`` variable
and the YAML key). ``KafkaSettings`` and ``RedisSettings`` are shared with the trainer
(``kafka://TOPIC`` replay) and the HTTP service; ``WorkerSettings`` (``worker start``) inherits
them and the batching and limit groups, and hands each group to the code that needs it
(``settings.kafka``, ``settings.redis``, ``settings.batch``, ``settings.limits``).
"""

from __future__ import annotations

import datetime as dt
import ssl
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, FilePath, model_validator
from pydantic_settings import CliSuppress

from model.config import Backend, Device
from model.errors import ConfigError
from stream.config import (
    Duration,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Settings,
    Upper,
    choices,
    duration_seconds,
)

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
Guarantee = Literal["at_least_once", "exactly_once"]
EmitMode = Literal["every", "latest"]
IntervalCalibration = Literal["online", "static"]
Engine = Literal["native", "faust"]
OffsetReset = Literal["earliest", "latest"]
FaultPoint = Literal[
    "after_window_write", "after_publish", "before_commit", "stall_infer", "slow_infer"
]
SECURITY_PROTOCOLS = choices(SecurityProtocol)
SASL_MECHANISMS = choices(SaslMechanism)
GUARANTEES = choices(Guarantee)
FAULT_POINTS = choices(FaultPoint)

# A file that must exist when given ("" counts as not given).
OptionalFile = Annotated[FilePath | None, BeforeValidator(lambda v: v or None)]


def parse_duration(text: str | float | int | None, flag: str) -> dt.timedelta | None:
    """``"10m"``, ``"1h30m"``, ``"90s"``, ``"250ms"``, ``"2d"``, ``"HH:MM:SS"`` or plain seconds
    -> timedelta; None or "" -> None. ConfigError naming ``flag`` for anything else or <= 0."""
    try:
        seconds = duration_seconds(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    return None if seconds is None else dt.timedelta(seconds=seconds)


def _topic_name(flag: str, topic: str) -> None:
    if not topic or len(topic) > 249 or any(not (c.isalnum() or c in "._-") for c in topic):
        raise ConfigError(f"{flag}: {topic!r} is not a valid Kafka topic name")


# ---- Kafka -------------------------------------------------------------------------------------


class KafkaSettings(Settings):
    """How to reach the Kafka cluster: brokers, security protocol, SASL and TLS material."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="comma-separated HOST:PORT list")
    security_protocol: Annotated[SecurityProtocol, Upper] = "PLAINTEXT"
    sasl_mechanism: Annotated[SaslMechanism | None, Upper] = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: OptionalFile = Field(None, description="CA bundle (PEM) to verify the brokers")
    ssl_certfile: OptionalFile = Field(None, description="client certificate (PEM) for mutual TLS")
    ssl_keyfile: OptionalFile = Field(None, description="client private key (PEM)")
    client_id: CliSuppress[str] = "eventcast"

    @model_validator(mode="after")
    def _check_kafka(self) -> KafkaSettings:
        if self.bootstrap_servers is None:  # optional for `worker serve`: Kafka not used
            return self
        if not str(self.bootstrap_servers).strip():
            raise ConfigError("--bootstrap-servers: must name at least one HOST:PORT")
        for part in str(self.bootstrap_servers).split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"--bootstrap-servers: {part.strip()!r} is not HOST:PORT")
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism is None:
                raise ConfigError(
                    f"--sasl-mechanism: required with --security-protocol {self.security_protocol}"
                )
            if not self.sasl_username or self.sasl_password is None:
                raise ConfigError(
                    "--sasl-username/--sasl-password: required with a SASL security protocol"
                )
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ConfigError(
                "--ssl-certfile/--ssl-keyfile: give both (client certificate) or none"
            )
        return self

    @cached_property
    def kafka(self) -> KafkaSettings:
        """The Kafka connection alone (for a settings class that inherits it)."""
        return self.view(KafkaSettings)

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        """A TLS context from the CA and client files (None without TLS). The system trust store
        is used when no CA file is given."""
        if not self.uses_tls:
            return None
        ctx = ssl.create_default_context(cafile=self.ssl_cafile)
        if self.ssl_certfile:
            ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return ctx

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by ``AIOKafkaConsumer``, ``AIOKafkaProducer`` and
        ``AIOKafkaAdminClient``."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "client_id": self.client_id,
        }
        if self.uses_tls:
            kwargs["ssl_context"] = self.ssl_context()
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        return kwargs


# ---- Redis -------------------------------------------------------------------------------------


class RedisSettings(Settings):
    """How to reach Redis (``redis://`` or ``rediss://`` URL, ACL user, TLS files), whether it is
    a Redis Cluster, and the key prefix of everything the worker stores there.

    ``redis_cluster``: the URL names any one node of a Redis Cluster; the client discovers the
    others and sends each command to the primary of its key's slot. Every key of a partition
    shares one hash tag (:func:`stream.store.partition_keys`), so a batch's fenced write is still
    one atomic script on one node. A cluster has only database 0.
    """

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="redis://[user:pass@]host:port/db or rediss://"
    )
    redis_username: str | None = Field(None, description="ACL user")
    redis_password: str | None = None
    redis_ssl_ca_certs: OptionalFile = None
    redis_ssl_certfile: OptionalFile = None
    redis_ssl_keyfile: OptionalFile = None
    redis_prefix: str = Field("eventcast", description="prefix of every key")
    redis_cluster: bool = Field(
        False,
        description="the Redis is a Redis Cluster; --redis-url names any one node (the others "
        "are discovered)",
    )

    @model_validator(mode="after")
    def _check_redis(self) -> RedisSettings:
        if self.redis_url is not None and not str(self.redis_url).startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                f"--redis-url: expected redis://, rediss:// or unix://, got {self.redis_url!r}"
            )
        if not self.redis_prefix or any(c in self.redis_prefix for c in "{} "):
            raise ConfigError(
                f"--redis-prefix: must be non-empty without braces or spaces: {self.redis_prefix!r}"
            )
        if bool(self.redis_ssl_certfile) != bool(self.redis_ssl_keyfile):
            raise ConfigError("--redis-ssl-certfile/--redis-ssl-keyfile: give both or none")
        if self.redis_cluster and self.redis_url is not None:
            url = str(self.redis_url)
            if url.startswith("unix://"):
                raise ConfigError("--redis-url: a Redis Cluster is reached over TCP, not unix://")
            db = url.split("://", 1)[1].partition("/")[2].split("?", 1)[0]
            if db not in ("", "0"):
                raise ConfigError(
                    f"--redis-url: a Redis Cluster has only database 0, got /{db} (isolate "
                    "deployments with --redis-prefix)"
                )
        return self

    @cached_property
    def redis(self) -> RedisSettings:
        """The Redis connection alone (for a settings class that inherits it)."""
        return self.view(RedisSettings)

    @property
    def url(self) -> str:
        return str(self.redis_url)

    @property
    def prefix(self) -> str:
        return self.redis_prefix

    def client_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.redis_username:
            kwargs["username"] = self.redis_username
        if self.redis_password is not None:
            kwargs["password"] = self.redis_password
        if self.url.startswith("rediss://"):
            if self.redis_ssl_ca_certs:
                kwargs["ssl_ca_certs"] = str(self.redis_ssl_ca_certs)
            if self.redis_ssl_certfile:
                kwargs["ssl_certfile"] = str(self.redis_ssl_certfile)
                kwargs["ssl_keyfile"] = str(self.redis_ssl_keyfile)
        return kwargs

    def client(self, **extra: Any) -> Any:
        """A new ``redis.asyncio.Redis`` client, or with ``redis_cluster`` a
        ``redis.asyncio.cluster.RedisCluster`` (not connected until first used). Both take the
        same credentials, TLS files and timeouts; the cluster client follows MOVED/ASK
        redirections and re-reads the slot map after a failover by itself."""
        import redis.asyncio as aioredis
        from redis.asyncio.cluster import RedisCluster

        kwargs = {"socket_timeout": 5.0, "socket_connect_timeout": 3.0, **self.client_kwargs()}
        kwargs.update(extra)
        if self.redis_cluster:
            return RedisCluster.from_url(self.url, **kwargs)
        return aioredis.Redis.from_url(self.url, **kwargs)


# ---- batching and limits -----------------------------------------------------------------------


class BatchSettings(Settings):
    """Micro-batching: a batch closes at ``max_batch`` events or ``max_delay_ms`` after its
    first event; at most ``queue_size`` fetched batches wait for inference before fetching
    pauses (one under a latency budget: :mod:`stream.pipeline`). On the CPU the model runs on
    chunks of at most ``infer_batch`` windows (small batches keep the recurrent state in the
    cache: faster per window than one large call); on a GPU the whole batch goes in one call.

    ``latency_budget_ms`` (native engine; :mod:`stream.budget`): the batcher sizes each batch
    from the measured fixed and per-record costs of a batch so that an event's expected time
    from fetch to publish stays within it, below ``max_batch`` (a hard cap) and with a fill wait
    below ``max_delay_ms``; under backlog it grows batches back towards ``max_batch``. 0 turns it
    off. The default, 100 ms, is the design's p99 event-to-forecast target for the seed-size
    model (docs/design.md); docs/benchmarks.md's stage means put a batch at about 15 ms plus
    0.7 ms per record for that model (0.25 ms for the small one) on 2 cores, so 100 ms leaves
    room for about 120 (340) records a batch, more than the default model's batches at half
    capacity (docs/operations.md, "Batching and the latency budget")."""

    max_batch: PositiveInt = 2048
    max_delay_ms: NonNegativeFloat = 20.0
    queue_size: PositiveInt = 2
    infer_batch: PositiveInt = Field(256, description="most windows per model call on the CPU")
    latency_budget_ms: NonNegativeFloat = Field(
        100.0,
        description="the batcher sizes batches from their measured costs to keep an event's "
        "fetch-to-publish time within this (never above --max-batch or --max-delay-ms; grows "
        "them again under backlog); 0: off (native engine only)",
    )

    @property
    def max_delay(self) -> float:
        """``max_delay_ms`` in seconds."""
        return self.max_delay_ms / 1000.0

    @property
    def latency_budget(self) -> float | None:
        """``latency_budget_ms`` in seconds; None when off (0)."""
        return self.latency_budget_ms / 1000.0 if self.latency_budget_ms > 0 else None

    @cached_property
    def batch(self) -> BatchSettings:
        return self.view(BatchSettings)


class LimitSettings(Settings):
    """Per-partition state limits.

    ``max_series_per_partition``: series a partition may hold; an event of a new series beyond it
    goes to the dead-letter topic (``series_limit``). ``series_ttl``: a series whose newest ``ts``
    is more than this many seconds behind the newest ``ts`` of its partition is idle and forgotten
    (event time, so a replay from Kafka decides exactly as the live run did); 0 disables it.
    ``window_history``: extra points kept per series beyond the model window, so a redelivered
    event can be forecast from the window as it stood at its offset. ``rebuild_lookback``: when a
    partition's state is lost in Redis (or unreadable), 0 (the default) re-reads the partition from
    the start of its log, which rebuilds it exactly provided the input topic still holds its whole
    history (docs/design.md, "State, fencing and rebuild"); N > 0 re-reads only the last N records
    before the committed offset: faster, but a series with no point among them is lost and the
    others may differ (a WARNING says so at each such rebuild).
    """

    max_series_per_partition: PositiveInt = 100_000
    series_ttl: NonNegativeFloat = Field(
        7 * 86_400.0,
        description="seconds of event time after which an idle series is forgotten (0: never)",
    )
    window_history: NonNegativeInt = 48
    rebuild_lookback: NonNegativeInt = Field(
        0,
        description="0: a lost partition is rebuilt exactly from its whole log; N: only from the "
        "last N records (inexact for sparser series)",
    )

    @cached_property
    def limits(self) -> LimitSettings:
        return self.view(LimitSettings)


# ---- the worker --------------------------------------------------------------------------------


def _parse_fault(text: Any) -> Any:
    if text is None or isinstance(text, Fault):
        return text
    if not text:
        return None
    point, _, n = str(text).partition(":")
    if point not in FAULT_POINTS or not n.isdigit() or int(n) < 1:
        raise ConfigError(
            f"EVENTCAST_FAULT: expected POINT:N with POINT one of {', '.join(FAULT_POINTS)}"
        )
    return Fault.model_validate({"point": point, "n": int(n)})


class Fault(Settings):
    """Test-only fault injection (``EVENTCAST_FAULT=point:N``): the worker SIGKILLs itself at
    ``point`` on the ``n``-th batch that reaches it (``slow_infer``: every batch's inference
    takes ``n`` ms longer; see stream/faults.py)."""

    point: FaultPoint
    n: PositiveInt


class WorkerSettings(LimitSettings, BatchSettings, RedisSettings, KafkaSettings):
    """Everything ``worker start`` needs, validated; built once by the command and passed down."""

    model_dir: Path = Path("models")
    input_topic: str = "events"
    output_topic: str = "forecasts"
    dlq_topic: str = "events.dlq"
    group_id: str = "eventcast"
    group_instance_id: str | None = Field(
        None,
        description="static group membership: a restart within the session timeout keeps the "
        "partitions without a rebalance",
    )
    backend: Backend = "auto"
    device: Device = "auto"
    threads: PositiveInt | None = Field(
        None, description="inference threads (default: the number of cores)"
    )
    guarantee: Guarantee = "at_least_once"
    emit: EmitMode = "every"
    interval_calibration: IntervalCalibration = Field(
        "online",
        description="online: each series' interval widths adapt, per level and horizon step, to "
        "the coverage its forecasts achieved (adaptive conformal inference, stream/calibration.py; "
        "the state is kept with the window in Redis); static: the model's intervals as calibrated "
        "offline. Each forecast's `calibration` header says which",
    )
    engine: Engine = "native"
    wait_for_model: bool = Field(
        False,
        description="wait for a model version instead of exiting 3 when the directory is empty",
    )
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        9400, description="0 disables the HTTP endpoint"
    )
    metrics_host: str = "127.0.0.1"
    max_event_bytes: PositiveInt = 65536
    max_future_skew: Duration = Field(
        "5m",  # type: ignore[assignment]
        description="an event whose ts is further ahead of its Kafka record timestamp goes to the "
        "dead-letter topic as `future` (a duration: 90s, 5m, 1h)",
    )
    liveness_timeout: Duration = Field(
        "60s",  # type: ignore[assignment]
        description="/healthz answers 503 when records are waiting and no batch stage has made "
        "progress for this long, unless the worker paused on purpose (Redis or Kafka unavailable)",
    )
    auto_offset_reset: OffsetReset = "earliest"
    metadata_max_age_ms: PositiveInt = Field(
        300_000, description="how often topic metadata is refreshed (new partitions are noticed)"
    )
    session_timeout_ms: int = 10_000
    reload_interval: PositiveFloat = Field(
        1.0, description="seconds between checks of the model directory's CURRENT pointer"
    )
    gc_freeze: bool = Field(
        True,
        description="after start-up, move every object to Python's permanent GC generation, so "
        "that full collections do not walk the ~0.5 M objects of torch/onnxruntime and stall the "
        "event loop (stream/runtime.py: freeze_startup_objects)",
    )
    online_accuracy: bool = Field(
        True,
        description="score each forecast against its series' next actual, per model version "
        "(--no-online-accuracy: no accuracy work at all; eventcast_online_* stay empty)",
    )
    accuracy_window: PositiveInt = Field(
        1000, description="scores per version behind the rolling eventcast_online_mae/coverage"
    )
    shadow_version: str | None = Field(
        None,
        description="run this challenger version beside the serving one (same windows) and "
        "publish its forecasts to --shadow-topic",
    )
    shadow_model_dir: Path | None = Field(
        None,
        description="model directory of the shadow version (default: --model-dir; its CURRENT "
        "when --shadow-version is not given)",
    )
    shadow_topic: str | None = Field(
        None, description="topic of the shadow forecasts (default: <output-topic>.shadow)"
    )
    shadow_queue_size: PositiveInt = Field(
        16,
        description="batches waiting for the shadow model before new ones are dropped (counted) "
        "rather than slowing the serving path",
    )
    # Test-only (EVENTCAST_FAULT=point:N; no flag): see Fault.
    fault: CliSuppress[Annotated[Fault | None, BeforeValidator(_parse_fault)]] = None

    @model_validator(mode="after")
    def _check_worker(self) -> WorkerSettings:
        for name in ("input_topic", "output_topic", "dlq_topic"):
            _topic_name(f"--{name.replace('_', '-')}", getattr(self, name))
        if self.input_topic in (self.output_topic, self.dlq_topic):
            raise ConfigError("--input-topic: must differ from --output-topic and --dlq-topic")
        if not self.group_id:
            raise ConfigError("--group-id: must not be empty")
        if self.shadow_enabled:
            _topic_name("--shadow-topic", self.shadow_topic_name)
            if self.shadow_topic_name in (self.input_topic, self.output_topic, self.dlq_topic):
                raise ConfigError(
                    "--shadow-topic: must differ from --input-topic, --output-topic and --dlq-topic"
                )
            if self.engine != "native":
                raise ConfigError("--shadow-version/--shadow-model-dir: only with --engine native")
        return self

    @property
    def exactly_once(self) -> bool:
        return self.guarantee == "exactly_once"

    @property
    def shadow_enabled(self) -> bool:
        """A challenger version runs beside the serving one (``--shadow-version`` or
        ``--shadow-model-dir``; ``shadow_model_dir`` None: the serving model directory;
        ``shadow_version`` None: that directory's ``CURRENT``)."""
        return self.shadow_version is not None or self.shadow_model_dir is not None

    @property
    def shadow_topic_name(self) -> str:
        return self.shadow_topic or f"{self.output_topic}.shadow"
