"""The trainer's fixed choices, each defined once as a type (a light module: the CLI imports it
without pulling in the trainer)."""

from __future__ import annotations

from typing import Literal, get_args

GradientClipAlgorithm = Literal["norm", "value"]
CalibrationMode = Literal["conformal", "widen", "off"]  # what each does: train/calibrate.py
GRADIENT_CLIP_ALGORITHMS: tuple[str, ...] = get_args(GradientClipAlgorithm)
CALIBRATION_MODES: tuple[str, ...] = get_args(CalibrationMode)
