"""What a task is: task sets over multitask datasets, splits and task-balanced sampling."""

from hf_tae.tasks.sampling import TaskBalancedSampler
from hf_tae.tasks.taskset import TaskSet

__all__ = ["TaskBalancedSampler", "TaskSet"]
