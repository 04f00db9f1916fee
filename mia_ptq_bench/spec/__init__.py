"""Task specs: schema, precision plans and loading."""

from .loader import available_tasks, load_registered_task, load_task
from .plans import PrecisionPlan, levels_for_bits
from .schema import TaskSpec

__all__ = ["PrecisionPlan", "TaskSpec", "available_tasks", "levels_for_bits", "load_registered_task", "load_task"]
