"""The project's exception hierarchy.

Every error eventcast raises on purpose derives from :class:`EventcastError`, so callers (the CLI,
the worker loop, the HTTP service) can tell an expected, explained failure from a bug. The CLI maps
them to the exit codes of docs/contract.md: :class:`ConfigError` → 2, :class:`NoModelError` → 3, any
other :class:`EventcastError` → 1.

This module lives in ``model/`` because ``model/`` is the one package every other package imports
and it must not depend on Kafka or Redis; the stream-side errors subclass these in ``stream/``.
"""

from __future__ import annotations


class EventcastError(Exception):
    """Base class of every error eventcast raises deliberately."""


class ConfigError(EventcastError):
    """A setting is missing, malformed or inconsistent. The message names the setting."""


class NoModelError(EventcastError):
    """The model directory holds no serving version (no ``CURRENT`` pointer)."""


class ModelLoadError(EventcastError):
    """A model version failed a safety or sanity check and was not loaded.

    ``reason`` is a short machine-readable word (``manifest``, ``checksum``, ``config``,
    ``shape``, ``canary``, ``format``, ``missing``) used as a metric label.
    """

    def __init__(self, message: str, reason: str = "format") -> None:
        super().__init__(message)
        self.reason = reason


class InputError(ConfigError, ValueError):
    """Model input arrays are malformed: wrong shape, non-finite numbers, a missing feature.

    The message names the offending array or feature. It is a :class:`ConfigError` (a data file
    lacking a feature the model needs is a usage error, exit code 2) and a :class:`ValueError`
    (callers validating arrays can catch the builtin).
    """


class RegistryError(EventcastError):
    """A model-directory operation cannot be done: unknown version, nothing to roll back to,
    a version name that is not a plain folder name, a version that already exists."""
