"""What this CPU can run, for the tests that need it: a skip says why."""

from __future__ import annotations

import pytest

from model.export import cpu_bf16_autocast_lstm

# None where oneDNN runs an LSTM under bfloat16 autocast (AVX-512); the reason elsewhere.
NO_BF16_AUTOCAST = cpu_bf16_autocast_lstm()
needs_bf16_autocast = pytest.mark.skipif(
    NO_BF16_AUTOCAST is not None,
    reason=f"this CPU runs no LSTM under bf16 autocast ({NO_BF16_AUTOCAST}); "
    "--precision bf16-mixed trains float32 here (tests/train/test_features.py)",
)
