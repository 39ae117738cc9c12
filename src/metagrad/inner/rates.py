"""How learned learning rates are stored: as log-rates (positive, scale-free) or raw values."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["PARAMETERIZATIONS", "encode_rate", "decode_rate"]

PARAMETERIZATIONS = ("log", "raw")


def encode_rate(lr: float, shape: tuple[int, ...], parameterization: str, like: Tensor) -> Tensor:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"a learned inner learning rate must start finite and > 0, got {lr}")
    value = math.log(lr) if parameterization == "log" else lr
    return torch.full(shape, value, dtype=like.dtype, device=like.device)


def decode_rate(stored: Tensor, parameterization: str) -> Tensor:
    # Log-rates: an outer step of Adam changes the rate by a fixed *ratio*, which stays stable whatever
    # the rate's scale; raw rates near 0.01 under Adam at 1e-3 swing by 10 % per step and were unstable.
    return stored.exp() if parameterization == "log" else stored
