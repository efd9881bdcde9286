"""The reference Gemma 4 text decoder: the truth the optimized path is judged against."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import FULL, SLIDING, ConfigError, Gemma4Config, LayerSpec
from .model import Gemma4Reference
from .presets import DEFAULT_PRESET, PRESETS, get_preset
from .weights import CheckpointError, load_config, load_weights, random_weights, resolve, save_checkpoint


def load_model(path_or_preset: str | Path | Gemma4Config = DEFAULT_PRESET, dtype=torch.float32,
               device="cpu", seed: int = 0) -> Gemma4Reference:
    """The reference model for a preset (seeded random weights) or a checkpoint directory."""
    cfg, weights = resolve(path_or_preset, dtype, device, seed)
    return Gemma4Reference(cfg, weights)


__all__ = [
    "Gemma4Config", "LayerSpec", "ConfigError", "CheckpointError", "Gemma4Reference", "PRESETS",
    "DEFAULT_PRESET", "get_preset", "load_model", "resolve", "load_config", "load_weights",
    "random_weights", "save_checkpoint", "SLIDING", "FULL",
]
