"""Training callbacks: the hook for loggers such as Weights & Biases or MLflow, and the TensorBoard writer.

A callback is any object with some of these methods (:class:`Callback` has them all as no-ops, to subclass);
:class:`~metagrad.train.Trainer` calls them on rank 0 only::

    on_step(trainer, metrics)       after every meta-iteration: that iteration's loss, pre_loss, grad_norm, lr
    on_log(trainer, record)         whenever a line goes to metrics.jsonl: training means over the log window,
                                    or validation results; record["iteration"] is the step to log it at
    on_evaluate(trainer, metrics)   after each validation (val_mse or val_accuracy, ...)
    on_save(trainer, path)          after a checkpoint directory is written
    on_close(trainer)               when the trainer is closed (flush and finish here)

A W&B logger is four lines::

    class WandbLogger(metagrad.Callback):
        def __init__(self, **init): self.run = wandb.init(**init)
        def on_log(self, trainer, record): self.run.log(record, step=record["iteration"])
        def on_close(self, trainer): self.run.finish()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metagrad.errors import MissingDependencyError

__all__ = ["Callback", "TensorBoardLogger"]


class Callback:
    """Base class of training callbacks: every hook does nothing until overridden."""

    def on_step(self, trainer: Any, metrics: dict[str, float]) -> None:
        pass

    def on_log(self, trainer: Any, record: dict[str, Any]) -> None:
        pass

    def on_evaluate(self, trainer: Any, metrics: dict[str, float]) -> None:
        pass

    def on_save(self, trainer: Any, path: Path) -> None:
        pass

    def on_close(self, trainer: Any) -> None:
        pass


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingDependencyError(
            "train.tensorboard = true needs the tensorboard package: pip install 'metagrad[tensorboard]' "
            "(or pip install tensorboard), or set train.tensorboard = false"
        ) from None
    return SummaryWriter


class TensorBoardLogger(Callback):
    """Writes every metrics.jsonl record as TensorBoard scalars (``train.tensorboard = true`` adds one writing to
    ``RUN/tensorboard``). After a resume, the events the interrupted run wrote past its checkpoint are purged."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer_class = _summary_writer()  # fail at construction, not at the first log line
        self.writer: Any = None

    def on_log(self, trainer: Any, record: dict[str, Any]) -> None:
        if self.writer is None:
            start = getattr(trainer, "start_iteration", 0)
            self.writer = self._writer_class(str(self.log_dir), purge_step=start + 1 if start else None)
        step = int(record["iteration"])
        for key, value in record.items():
            if key != "iteration" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)

    def on_close(self, trainer: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
