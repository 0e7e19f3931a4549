"""Safe weight formats: safetensors for serving, weights-only reading of torch checkpoints.

Nothing here unpickles arbitrary objects: safetensors is a flat tensor format, and any
``torch.load`` uses ``weights_only=True`` (torch's restricted unpickler that accepts tensors and
builtin containers only), so a checkpoint carrying a code payload is refused before it runs.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.config import ModelConfig
from model.errors import ModelLoadError
from model.network import ForecastNet


def forecast_net(net: nn.Module) -> ForecastNet:
    """The plain :class:`ForecastNet` inside ``net`` (an EventForecaster or a ForecastNet)."""
    inner = getattr(net, "net", net)
    if not isinstance(inner, ForecastNet):
        raise TypeError(f"expected an EventForecaster or ForecastNet, got {type(net).__name__}")
    return inner


def state_dict_cpu(net: nn.Module) -> dict[str, Tensor]:
    """ForecastNet weights as contiguous float32 CPU tensors (what safetensors stores)."""
    return {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in forecast_net(net).state_dict().items()
    }


def save_weights(net: nn.Module, path: Path | str) -> None:
    """Write the ForecastNet weights of ``net`` to a safetensors file."""
    from safetensors.torch import save_file

    save_file(state_dict_cpu(net), str(path), metadata={"format": "eventcast-forecastnet"})


def parse_weights(data: bytes, source: str = "weights") -> dict[str, Tensor]:
    """Tensors of a safetensors blob; anything else raises ModelLoadError(reason="format")."""
    from safetensors.torch import load as st_load

    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own SafetensorError and others
        raise ModelLoadError(f"{source}: not a valid safetensors file ({e})", "format") from e


def build_net(
    config: ModelConfig, weights: Mapping[str, Tensor], source: str = "weights"
) -> ForecastNet:
    """A ForecastNet for ``config`` loaded with ``weights``, in eval mode on the CPU.

    Raises ModelLoadError(reason="shape") when a tensor is missing, unexpected, or its shape or
    dtype differs from what ``config`` implies.
    """
    net = ForecastNet(config)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ModelLoadError(
            f"{source}: tensors do not match the config (missing {missing[:5]}, "
            f"unexpected {extra[:5]})",
            "shape",
        )
    for k, ref in expected.items():
        got = weights[k]
        if tuple(got.shape) != tuple(ref.shape):
            raise ModelLoadError(
                f"{source}: tensor {k} has shape {tuple(got.shape)}, the config implies "
                f"{tuple(ref.shape)}",
                "shape",
            )
        if got.dtype != ref.dtype:
            raise ModelLoadError(
                f"{source}: tensor {k} has dtype {got.dtype}, want {ref.dtype}", "shape"
            )
    net.load_state_dict(dict(weights), strict=True)
    return net.eval()


def load_weights(path: Path | str, config: ModelConfig) -> ForecastNet:
    """Read a safetensors file written by :func:`save_weights` into a ForecastNet (eval, CPU)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"{p}: cannot read ({e})", "missing") from e
    return build_net(config, parse_weights(data, str(p)), str(p))


def load_checkpoint_weights(path: Path | str) -> dict[str, Tensor]:
    """ForecastNet weights from a torch/Lightning checkpoint, read with ``weights_only=True``.

    Accepts a Lightning ``.ckpt`` (weights under ``state_dict`` with a ``net.`` prefix) or a plain
    state dict saved with ``torch.save``. Returns the ForecastNet state dict (prefix stripped).

    Raises:
        ModelLoadError(reason="format"): the file holds a pickle with anything but tensors and
            builtin containers (e.g. a code payload; it is refused, never executed), or is not a
            torch checkpoint at all.
        ModelLoadError(reason="missing"): the file cannot be read.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"{p}: checkpoint file not found", "missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notices of the restricted loader
            obj: Any = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"{p}: refused to load: the checkpoint contains Python objects other than tensors "
            f"(possibly a code payload); only weights-only checkpoints are accepted "
            f"({_unpickler_reason(e)})",
            "format",
        ) from e
    except Exception as e:
        raise ModelLoadError(f"{p}: not a readable torch checkpoint ({e})", "format") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ModelLoadError(f"{p}: checkpoint holds no state dict of tensors", "format")
    if any(k.startswith("net.") for k in sd):
        sd = {k[len("net.") :]: v for k, v in sd.items() if k.startswith("net.")}
    return dict(sd)


def _unpickler_reason(e: Exception) -> str:
    # torch's message goes on to explain how to bypass the check; keep only what was refused.
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error" in line:
            text = line[line.index("WeightsUnpickler error") :].split(" Please", 1)[0]
            if text.endswith(":") and i + 1 < len(lines):
                text += " " + lines[i + 1].split(" Please", 1)[0]
            return text.rstrip(".")
    return lines[0][:200] if lines else type(e).__name__
