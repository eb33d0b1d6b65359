"""Verifiable tasks behind one interface and registry (``task.name`` + ``task.options`` in configs)."""

from rspo.tasks import code as code  # the task modules register "countdown", "math", "arithmetic", "code"
from rspo.tasks import countdown as countdown
from rspo.tasks import math as math
from rspo.tasks.base import (
    FileTask,
    Message,
    NoOptions,
    Prompt,
    Task,
    Verdict,
    import_object,
    list_tasks,
    make_task,
    register_task,
    task_class,
    task_options,
)

__all__ = [
    "FileTask",
    "Message",
    "NoOptions",
    "Prompt",
    "Task",
    "Verdict",
    "import_object",
    "list_tasks",
    "make_task",
    "register_task",
    "task_class",
    "task_options",
]
