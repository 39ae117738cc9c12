"""Task families and the batch format shared by every algorithm."""

from metagrad.tasks.base import TaskBatch, TaskDistribution
from metagrad.tasks.sinusoid import SCORINGS, OracleSinusoid, Sinusoid

__all__ = ["TaskBatch", "TaskDistribution", "Sinusoid", "OracleSinusoid", "SCORINGS"]
