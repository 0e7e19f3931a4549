"""Settings of the streaming worker: one frozen object per process, built once from the CLI.

``KafkaSettings`` and ``RedisSettings`` are shared with the trainer (``kafka://TOPIC`` replay)
and the HTTP service; ``WorkerSettings`` nests them with the flags of ``worker start``. Each
``from_args`` validates what it reads and raises :class:`~model.errors.ConfigError` naming the
flag, so the CLI turns a bad value into exit code 2 with a message the user can act on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import BACKENDS, DEVICES
from model.errors import ConfigError

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
GUARANTEES = ("at_least_once", "exactly_once")
EMIT_MODES = ("every", "latest")
ENGINES = ("native", "faust")
OFFSET_RESETS = ("earliest", "latest")
FAULT_POINTS = ("after_window_write", "after_publish", "before_commit", "stall_infer")


def _readable_file(flag: str, path: str | None) -> str | None:
    if path is None or path == "":
        return None
    if not Path(path).is_file():
        raise ConfigError(f"{flag}: {path} is not a readable file")
    return path


def _choice(flag: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{flag}: expected one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _positive(flag: str, value: Any, *, allow_zero: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{flag}: expected a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{flag}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | float | int | None, flag: str) -> dt.timedelta | None:
    """``"10m"``, ``"1h30m"``, ``"90s"``, ``"250ms"``, ``"2d"``, ``"HH:MM:SS"`` or plain seconds
    -> timedelta; None or "" -> None. ConfigError naming ``flag`` for anything else or <= 0."""
    if text is None or text == "":
        return None
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip()
        try:
            seconds = float(s)
        except ValueError:
            if ":" in s:
                try:
                    nums = [float(p) for p in s.split(":")]
                except ValueError:
                    raise ConfigError(f"{flag}: cannot read duration {text!r}") from None
                seconds = 0.0
                for n in nums:
                    seconds = seconds * 60 + n
            else:
                pos, seconds = 0, 0.0
                for m in _DURATION.finditer(s):
                    if s[pos : m.start()].strip():
                        break
                    seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
                    pos = m.end()
                if pos == 0 or s[pos:].strip():
                    raise ConfigError(
                        f"{flag}: cannot read duration {text!r} (e.g. 90s, 10m, 1h30m)"
                    ) from None
    if not seconds > 0:
        raise ConfigError(f"{flag}: must be a positive duration, got {text!r}")
    return dt.timedelta(seconds=seconds)


def _seconds(text: str | float | int | None, flag: str) -> float:
    d = parse_duration(text, flag)
    if d is None:
        raise ConfigError(f"{flag}: a duration is required (e.g. 90s, 5m)")
    return d.total_seconds()


# ---- Kafka -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KafkaSettings:
    """How to reach the Kafka cluster: brokers, security protocol, SASL and TLS material."""

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    client_id: str = "eventcast"

    def __post_init__(self) -> None:
        if not self.bootstrap_servers or not str(self.bootstrap_servers).strip():
            raise ConfigError("--bootstrap-servers: must name at least one HOST:PORT")
        for part in str(self.bootstrap_servers).split(","):
            host, _, port = part.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"--bootstrap-servers: {part.strip()!r} is not HOST:PORT")
        _choice("--security-protocol", self.security_protocol, SECURITY_PROTOCOLS)
        sasl = self.security_protocol.startswith("SASL")
        if sasl:
            if self.sasl_mechanism is None:
                raise ConfigError(
                    f"--sasl-mechanism: required with --security-protocol {self.security_protocol}"
                )
            _choice("--sasl-mechanism", self.sasl_mechanism, SASL_MECHANISMS)
            if not self.sasl_username or self.sasl_password is None:
                raise ConfigError(
                    "--sasl-username/--sasl-password: required with a SASL security protocol"
                )
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ConfigError(
                "--ssl-certfile/--ssl-keyfile: give both (client certificate) or none"
            )

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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> KafkaSettings:
        """From the flags of :func:`add_kafka_arguments`; invalid → ConfigError naming the flag."""
        return cls(
            bootstrap_servers=getattr(args, "bootstrap_servers", cls.bootstrap_servers),
            security_protocol=str(getattr(args, "security_protocol", "PLAINTEXT")).upper(),
            sasl_mechanism=getattr(args, "sasl_mechanism", None) or None,
            sasl_username=getattr(args, "sasl_username", None) or None,
            sasl_password=getattr(args, "sasl_password", None),
            ssl_cafile=_readable_file("--ssl-cafile", getattr(args, "ssl_cafile", None)),
            ssl_certfile=_readable_file("--ssl-certfile", getattr(args, "ssl_certfile", None)),
            ssl_keyfile=_readable_file("--ssl-keyfile", getattr(args, "ssl_keyfile", None)),
            client_id=getattr(args, "client_id", None) or cls.client_id,
        )


def add_kafka_arguments(parser: argparse.ArgumentParser) -> None:
    """The Kafka connection flags (also settable as ``EVENTCAST_<FLAG>`` or in ``--config``)."""
    g = parser.add_argument_group("kafka")
    g.add_argument(
        "--bootstrap-servers",
        default=KafkaSettings.bootstrap_servers,
        help="comma-separated HOST:PORT list",
    )
    g.add_argument(
        "--security-protocol", default="PLAINTEXT", type=str.upper, choices=SECURITY_PROTOCOLS
    )
    g.add_argument("--sasl-mechanism", default=None, type=str.upper, choices=SASL_MECHANISMS)
    g.add_argument("--sasl-username", default=None)
    g.add_argument("--sasl-password", default=None)
    g.add_argument("--ssl-cafile", default=None, help="CA bundle (PEM) to verify the brokers")
    g.add_argument("--ssl-certfile", default=None, help="client certificate (PEM) for mutual TLS")
    g.add_argument("--ssl-keyfile", default=None, help="client private key (PEM)")


# ---- Redis -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisSettings:
    """How to reach Redis (``redis://`` or ``rediss://`` URL, ACL user, TLS files) and the key
    prefix of everything the worker stores there."""

    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password: str | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    prefix: str = "eventcast"

    def __post_init__(self) -> None:
        if not str(self.url).startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"--redis-url: expected redis://, rediss:// or unix://, got {self.url!r}"
            )
        if not self.prefix or any(c in self.prefix for c in "{} "):
            raise ConfigError(
                f"--redis-prefix: must be non-empty without braces or spaces: {self.prefix!r}"
            )
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ConfigError("--redis-ssl-certfile/--redis-ssl-keyfile: give both or none")

    def client_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.username:
            kwargs["username"] = self.username
        if self.password is not None:
            kwargs["password"] = self.password
        if self.url.startswith("rediss://"):
            if self.ssl_ca_certs:
                kwargs["ssl_ca_certs"] = self.ssl_ca_certs
            if self.ssl_certfile:
                kwargs["ssl_certfile"] = self.ssl_certfile
                kwargs["ssl_keyfile"] = self.ssl_keyfile
        return kwargs

    def client(self, **extra: Any) -> Any:
        """A new ``redis.asyncio.Redis`` client (not connected until first used)."""
        import redis.asyncio as aioredis

        kwargs = {"socket_timeout": 5.0, "socket_connect_timeout": 3.0, **self.client_kwargs()}
        kwargs.update(extra)
        return aioredis.Redis.from_url(self.url, **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RedisSettings:
        """From the flags of :func:`add_redis_arguments`; invalid → ConfigError naming the flag."""
        return cls(
            url=getattr(args, "redis_url", cls.url),
            username=getattr(args, "redis_username", None) or None,
            password=getattr(args, "redis_password", None),
            ssl_ca_certs=_readable_file(
                "--redis-ssl-ca-certs", getattr(args, "redis_ssl_ca_certs", None)
            ),
            ssl_certfile=_readable_file(
                "--redis-ssl-certfile", getattr(args, "redis_ssl_certfile", None)
            ),
            ssl_keyfile=_readable_file(
                "--redis-ssl-keyfile", getattr(args, "redis_ssl_keyfile", None)
            ),
            prefix=getattr(args, "redis_prefix", None) or cls.prefix,
        )


def add_redis_arguments(parser: argparse.ArgumentParser) -> None:
    """The Redis connection flags."""
    g = parser.add_argument_group("redis")
    g.add_argument(
        "--redis-url",
        default=RedisSettings.url,
        help="redis://[user:pass@]host:port/db or rediss:// for TLS",
    )
    g.add_argument("--redis-username", default=None, help="ACL user")
    g.add_argument("--redis-password", default=None)
    g.add_argument("--redis-ssl-ca-certs", default=None)
    g.add_argument("--redis-ssl-certfile", default=None)
    g.add_argument("--redis-ssl-keyfile", default=None)
    g.add_argument("--redis-prefix", default=RedisSettings.prefix, help="prefix of every key")


# ---- online accuracy and shadow version (stream/accuracy.py, stream/shadow.py) ----------------


@dataclass(frozen=True)
class AccuracySettings:
    """Online accuracy (on unless ``--no-online-accuracy``): each forecast is scored against its
    series' next actual, per model version; ``window`` scores per version make the rolling
    gauges. Off, the worker does no accuracy work at all."""

    enabled: bool = True
    window: int = 1000

    def __post_init__(self) -> None:
        _positive("--accuracy-window", self.window)


@dataclass(frozen=True)
class ShadowSettings:
    """A challenger version run beside the serving one on the same windows, its forecasts
    published best-effort to ``topic`` (``--shadow-version`` / ``--shadow-model-dir``; both
    unset: no shadow). ``model_dir`` None: the serving model directory; ``version`` None: that
    directory's ``CURRENT``. ``queue_size``: batches waiting for the shadow model before new
    ones are dropped (counted) rather than slowing the serving path."""

    version: str | None = None
    model_dir: Path | None = None
    topic: str = "forecasts.shadow"
    queue_size: int = 16

    def __post_init__(self) -> None:
        _positive("--shadow-queue-size", self.queue_size)

    @property
    def enabled(self) -> bool:
        return self.version is not None or self.model_dir is not None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ShadowSettings:
        model_dir = getattr(args, "shadow_model_dir", None)
        return cls(
            version=getattr(args, "shadow_version", None) or None,
            model_dir=Path(model_dir) if model_dir else None,
            topic=getattr(args, "shadow_topic", None) or f"{args.output_topic}.shadow",
            queue_size=getattr(args, "shadow_queue_size", cls.queue_size),
        )


def add_ab_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of online accuracy and the shadow (challenger) version."""
    g = parser.add_argument_group("online accuracy and shadow version")
    g.add_argument(
        "--no-online-accuracy",
        dest="online_accuracy",
        action="store_false",
        help="do not score forecasts against the next actual (eventcast_online_* stay empty; "
        "EVENTCAST_ONLINE_ACCURACY=false does the same)",
    )
    g.add_argument(
        "--accuracy-window",
        type=int,
        default=AccuracySettings.window,
        help="scores per version behind the rolling eventcast_online_mae/coverage gauges",
    )
    g.add_argument(
        "--shadow-version",
        default=None,
        help="run this challenger version beside the serving one (same windows) and publish its "
        "forecasts to --shadow-topic",
    )
    g.add_argument(
        "--shadow-model-dir",
        default=None,
        help="model directory of the shadow version (default: --model-dir; its CURRENT when "
        "--shadow-version is not given)",
    )
    g.add_argument(
        "--shadow-topic", default=None, help="topic of the shadow forecasts (<output-topic>.shadow)"
    )
    g.add_argument("--shadow-queue-size", type=int, default=ShadowSettings.queue_size)


# ---- the worker --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSettings:
    """Micro-batching: a batch closes at ``max_batch`` events or ``max_delay`` seconds after its
    first event; at most ``queue_size`` fetched batches wait for inference before fetching
    pauses. On the CPU the model runs on chunks of at most ``infer_batch`` windows (small batches
    keep the recurrent state in the cache: faster per window than one large call); on a GPU the
    whole batch goes in one call."""

    max_batch: int = 2048
    max_delay: float = 0.02
    queue_size: int = 2
    infer_batch: int = 256

    def __post_init__(self) -> None:
        _positive("--max-batch", self.max_batch)
        _positive("--max-delay-ms", self.max_delay, allow_zero=True)
        _positive("--queue-size", self.queue_size)
        _positive("--infer-batch", self.infer_batch)


@dataclass(frozen=True)
class LimitSettings:
    """Per-partition state limits.

    ``max_series``: series a partition may hold; an event of a new series beyond it goes to the
    dead-letter topic (``series_limit``). ``series_ttl``: a series whose newest ``ts`` is more
    than this many seconds behind the newest ``ts`` of its partition is idle and forgotten
    (event time, so a replay from Kafka decides exactly as the live run did); 0 disables it.
    ``history``: extra points kept per series beyond the model window, so a redelivered event can
    be forecast from the window as it stood at its offset. ``rebuild_lookback``: how many records
    before the committed offset are re-read when a partition's state is lost in Redis.
    """

    max_series: int = 100_000
    series_ttl: float = 7 * 86_400.0
    history: int = 48
    rebuild_lookback: int = 1_000_000

    def __post_init__(self) -> None:
        _positive("--max-series-per-partition", self.max_series)
        _positive("--series-ttl", self.series_ttl, allow_zero=True)
        _positive("--window-history", self.history, allow_zero=True)
        _positive("--rebuild-lookback", self.rebuild_lookback, allow_zero=True)


@dataclass(frozen=True)
class Fault:
    """Test-only fault injection (``EVENTCAST_FAULT=point:N``): the worker SIGKILLs itself at
    ``point`` on the ``n``-th batch that reaches it."""

    point: str
    n: int

    @classmethod
    def parse(cls, text: str | None) -> Fault | None:
        if not text:
            return None
        point, _, n = text.partition(":")
        if point not in FAULT_POINTS or not n.isdigit() or int(n) < 1:
            raise ConfigError(
                f"EVENTCAST_FAULT: expected POINT:N with POINT one of {', '.join(FAULT_POINTS)}"
            )
        return cls(point, int(n))


@dataclass(frozen=True)
class WorkerSettings:
    """Everything ``worker start`` needs, validated; built once by the command and passed down."""

    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    model_dir: Path = Path("models")
    input_topic: str = "events"
    output_topic: str = "forecasts"
    dlq_topic: str = "events.dlq"
    group_id: str = "eventcast"
    group_instance_id: str | None = None
    backend: str = "auto"
    device: str = "auto"
    threads: int | None = None
    guarantee: str = "at_least_once"
    emit: str = "every"
    engine: str = "native"
    wait_for_model: bool = False
    metrics_port: int = 9400
    metrics_host: str = "127.0.0.1"
    max_event_bytes: int = 65536
    max_future_skew: float = 300.0  # seconds an event's ts may be ahead of its Kafka timestamp
    liveness_timeout: float = 60.0  # seconds without progress (records waiting) -> /healthz 503
    auto_offset_reset: str = "earliest"
    metadata_max_age_ms: int = 300_000
    session_timeout_ms: int = 10_000
    reload_interval: float = 1.0
    gc_freeze: bool = True
    batch: BatchSettings = field(default_factory=BatchSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    fault: Fault | None = None
    accuracy: AccuracySettings = field(default_factory=AccuracySettings)
    shadow: ShadowSettings = field(default_factory=ShadowSettings)

    def __post_init__(self) -> None:
        for flag, topic in (
            ("--input-topic", self.input_topic),
            ("--output-topic", self.output_topic),
            ("--dlq-topic", self.dlq_topic),
        ):
            if not topic or len(topic) > 249 or any(not (c.isalnum() or c in "._-") for c in topic):
                raise ConfigError(f"{flag}: {topic!r} is not a valid Kafka topic name")
        if self.input_topic in (self.output_topic, self.dlq_topic):
            raise ConfigError("--input-topic: must differ from --output-topic and --dlq-topic")
        if not self.group_id:
            raise ConfigError("--group-id: must not be empty")
        _choice("--backend", self.backend, BACKENDS)
        _choice("--device", self.device, DEVICES)
        _choice("--guarantee", self.guarantee, GUARANTEES)
        _choice("--emit", self.emit, EMIT_MODES)
        _choice("--engine", self.engine, ENGINES)
        _choice("--auto-offset-reset", self.auto_offset_reset, OFFSET_RESETS)
        if not isinstance(self.metrics_port, int) or not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port: expected 0..65535, got {self.metrics_port!r}")
        _positive("--max-event-bytes", self.max_event_bytes)
        _positive("--max-future-skew", self.max_future_skew)
        _positive("--liveness-timeout", self.liveness_timeout)
        _positive("--metadata-max-age-ms", self.metadata_max_age_ms)
        _positive("--reload-interval", self.reload_interval)
        if self.threads is not None:
            _positive("--threads", self.threads)
        self._check_shadow()

    def _check_shadow(self) -> None:
        if not self.shadow.enabled:
            return
        topic = self.shadow.topic
        if not topic or len(topic) > 249 or any(not (c.isalnum() or c in "._-") for c in topic):
            raise ConfigError(f"--shadow-topic: {topic!r} is not a valid Kafka topic name")
        if topic in (self.input_topic, self.output_topic, self.dlq_topic):
            raise ConfigError(
                "--shadow-topic: must differ from --input-topic, --output-topic and --dlq-topic"
            )
        if self.engine != "native":
            raise ConfigError("--shadow-version/--shadow-model-dir: only with --engine native")

    @property
    def exactly_once(self) -> bool:
        return self.guarantee == "exactly_once"

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, environ: dict[str, str] | None = None
    ) -> WorkerSettings:
        """From the parsed flags of ``worker start`` (see ``stream.commands``). ``environ`` is
        read only for the test-only ``EVENTCAST_FAULT`` hook."""
        environ = dict(os.environ) if environ is None else environ
        return cls(
            kafka=KafkaSettings.from_args(args),
            redis=RedisSettings.from_args(args),
            model_dir=Path(args.model_dir),
            input_topic=args.input_topic,
            output_topic=args.output_topic,
            dlq_topic=args.dlq_topic,
            group_id=args.group_id,
            group_instance_id=args.group_instance_id or None,
            backend=args.backend,
            device=args.device,
            threads=args.threads,
            guarantee=args.guarantee,
            emit=args.emit,
            engine=args.engine,
            wait_for_model=bool(args.wait_for_model),
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            max_event_bytes=args.max_event_bytes,
            max_future_skew=_seconds(args.max_future_skew, "--max-future-skew"),
            liveness_timeout=_seconds(args.liveness_timeout, "--liveness-timeout"),
            auto_offset_reset=args.auto_offset_reset,
            metadata_max_age_ms=args.metadata_max_age_ms,
            session_timeout_ms=args.session_timeout_ms,
            reload_interval=args.reload_interval,
            gc_freeze=bool(getattr(args, "gc_freeze", True)),
            batch=BatchSettings(
                max_batch=args.max_batch,
                max_delay=args.max_delay_ms / 1000.0,
                queue_size=args.queue_size,
                infer_batch=getattr(args, "infer_batch", BatchSettings.infer_batch),
            ),
            limits=LimitSettings(
                max_series=args.max_series_per_partition,
                series_ttl=args.series_ttl,
                history=args.window_history,
                rebuild_lookback=args.rebuild_lookback,
            ),
            fault=Fault.parse(environ.get("EVENTCAST_FAULT")),
            accuracy=AccuracySettings(
                enabled=bool(getattr(args, "online_accuracy", True)),
                window=getattr(args, "accuracy_window", AccuracySettings.window),
            ),
            shadow=ShadowSettings.from_args(args),
        )


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``worker start`` (docs/contract.md plus batching, limits and tuning knobs)."""
    add_kafka_arguments(parser)
    add_redis_arguments(parser)
    g = parser.add_argument_group("worker")
    g.add_argument("--model-dir", default="models")
    g.add_argument("--input-topic", default="events")
    g.add_argument("--output-topic", default="forecasts")
    g.add_argument("--dlq-topic", default="events.dlq")
    g.add_argument("--group-id", default="eventcast")
    g.add_argument(
        "--group-instance-id",
        default=None,
        help="static group membership: a restart within the session timeout keeps the "
        "partitions without a rebalance",
    )
    g.add_argument("--backend", default="auto", choices=BACKENDS)
    g.add_argument("--device", default="auto", choices=DEVICES)
    g.add_argument(
        "--threads", type=int, default=None, help="inference threads (default: the number of cores)"
    )
    g.add_argument("--guarantee", default="at_least_once", choices=GUARANTEES)
    g.add_argument("--emit", default="every", choices=EMIT_MODES)
    g.add_argument("--engine", default="native", choices=ENGINES)
    g.add_argument(
        "--wait-for-model",
        action="store_true",
        help="wait for a model version instead of exiting 3 when the directory is empty",
    )
    g.add_argument("--metrics-port", type=int, default=9400, help="0 disables the HTTP endpoint")
    g.add_argument("--metrics-host", default="127.0.0.1")
    g.add_argument("--max-event-bytes", type=int, default=65536)
    g.add_argument(
        "--max-future-skew",
        default="5m",
        help="an event whose ts is further ahead of its Kafka record timestamp goes to the "
        "dead-letter topic as `future` (a duration: 90s, 5m, 1h; default %(default)s)",
    )
    g.add_argument(
        "--liveness-timeout",
        default="60s",
        help="/healthz answers 503 when records are waiting and no batch stage has made "
        "progress for this long, unless the worker paused on purpose (Redis or Kafka "
        "unavailable); default %(default)s",
    )
    g.add_argument("--auto-offset-reset", default="earliest", choices=OFFSET_RESETS)
    g.add_argument(
        "--metadata-max-age-ms",
        type=int,
        default=300_000,
        help="how often topic metadata is refreshed (new partitions are noticed)",
    )
    g.add_argument("--session-timeout-ms", type=int, default=10_000)
    g.add_argument(
        "--reload-interval",
        type=float,
        default=1.0,
        help="seconds between checks of the model directory's CURRENT pointer",
    )
    g.add_argument(
        "--gc-freeze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after start-up, move every object to Python's permanent GC generation, so that "
        "full collections do not walk the ~0.5 M objects of torch/onnxruntime and stall the "
        "event loop (stream/worker.py: freeze_startup_objects)",
    )
    b = parser.add_argument_group("batching and limits")
    b.add_argument("--max-batch", type=int, default=BatchSettings.max_batch)
    b.add_argument("--max-delay-ms", type=float, default=BatchSettings.max_delay * 1000)
    b.add_argument("--queue-size", type=int, default=BatchSettings.queue_size)
    b.add_argument(
        "--infer-batch", type=int, default=BatchSettings.infer_batch,
        help="most windows per model call on the CPU (default %(default)s)",
    )  # fmt: skip
    b.add_argument("--max-series-per-partition", type=int, default=LimitSettings.max_series)
    b.add_argument(
        "--series-ttl",
        type=float,
        default=LimitSettings.series_ttl,
        help="seconds of event time after which an idle series is forgotten (0: never)",
    )
    b.add_argument("--window-history", type=int, default=LimitSettings.history)
    b.add_argument("--rebuild-lookback", type=int, default=LimitSettings.rebuild_lookback)
    add_ab_arguments(parser)
