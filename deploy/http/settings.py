"""The settings of ``worker serve`` (built once by ``deploy.commands.serve_settings``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB (docs/contract.md)


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``worker serve`` needs, built once by the command and passed down."""

    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    reload_token: str | None = field(default=None, repr=False)  # never logged
    backend: str = "auto"
    device: str = "auto"
    threads: int | None = None
    refresh_seconds: float = 5.0  # live view refresh period
    title: str = "eventcast"
