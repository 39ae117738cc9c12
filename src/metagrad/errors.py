"""metagrad's own exceptions: bad input is reported as one clear line, never a traceback."""

from __future__ import annotations

__all__ = [
    "MetagradError",
    "ConfigError",
    "RunError",
    "DivergenceError",
    "CheckpointError",
    "DataError",
    "ModelError",
    "CompileError",
    "MissingDependencyError",
]


class MetagradError(Exception):
    """Base class of every error metagrad raises on purpose."""


class ConfigError(MetagradError, ValueError):
    """A configuration value, command-line argument or API argument is invalid."""


class RunError(MetagradError, ValueError):
    """A run directory is missing, is not a metagrad run, or would be overwritten."""


class CheckpointError(MetagradError, ValueError):
    """A checkpoint file is missing, truncated, corrupted or foreign."""


class DivergenceError(MetagradError, RuntimeError):
    """Training produced a NaN or inf."""


class DataError(MetagradError, ValueError):
    """A task batch or data set does not fit the learner (shapes, labels, dtype, empty sets)."""


class ModelError(MetagradError, ValueError):
    """A model cannot run under metagrad's transforms as it is (the message names the module and the fix)."""


class CompileError(MetagradError, RuntimeError):
    """``torch.compile``'s backend could not compile the meta-step (the message names the backend's error and the
    options to check)."""


class MissingDependencyError(MetagradError, ImportError):
    """An optional feature was asked for whose package is not installed (the message names the extra)."""
