"""Task families and the batch format shared by every algorithm."""

from metagrad.tasks.base import TaskBatch, TaskDistribution
from metagrad.tasks.episodes import EpisodeSampler
from metagrad.tasks.images import ImageEpisodes, load_images
from metagrad.tasks.omniglot import augment_rotations, lake_task_batch, load_lake_runs, load_omniglot, split_classes
from metagrad.tasks.sinusoid import SCORINGS, OracleSinusoid, Sinusoid

__all__ = [
    "TaskBatch",
    "TaskDistribution",
    "Sinusoid",
    "OracleSinusoid",
    "SCORINGS",
    "EpisodeSampler",
    "ImageEpisodes",
    "load_images",
    "load_omniglot",
    "split_classes",
    "augment_rotations",
    "load_lake_runs",
    "lake_task_batch",
]
