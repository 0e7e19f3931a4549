"""Errors of the streaming worker, all under the project's :class:`EventcastError`.

The CLI maps them to exit codes: :class:`TopicMissingError` is a configuration problem (2), the
others are runtime failures (1).
"""

from __future__ import annotations

from model.errors import ConfigError, EventcastError


class StreamError(EventcastError):
    """Base class of the worker's own errors."""


class KafkaUnavailableError(StreamError):
    """The brokers cannot be reached (or refused us); the message names the bootstrap servers."""


class TopicMissingError(ConfigError, StreamError):
    """A topic the worker needs does not exist; the message says which and how to create it."""


class RedisUnavailableError(StreamError):
    """Redis could not be reached after the retry policy gave up; says which operation."""


class StateConflictError(StreamError):
    """A partition's state in Redis is not the one this worker last wrote (Redis lost data, or
    another worker now owns the partition): the batch must not be committed and the partition's
    state must be reloaded."""

    def __init__(self, topic: str, partition: int, expected: str, found: str) -> None:
        super().__init__(
            f"{topic}[{partition}]: applied offset in Redis is {found or 'missing'}, "
            f"expected {expected or 'missing'}"
        )
        self.topic = topic
        self.partition = partition
        self.expected = expected
        self.found = found
