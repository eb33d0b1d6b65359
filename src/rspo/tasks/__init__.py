"""Verifiable tasks behind one interface and registry (``task.name`` + ``task.options`` in configs)."""

from rspo.prompts import Message, Prompt
from rspo.tasks import arithmetic as arithmetic  # the task modules register their tasks
from rspo.tasks import code as code
from rspo.tasks import countdown as countdown
from rspo.tasks import math as math
from rspo.tasks.base import (
    FileTask,
    NoOptions,
    Task,
    TaskConfig,
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
    "TaskConfig",
    "Verdict",
    "import_object",
    "list_tasks",
    "make_task",
    "register_task",
    "task_class",
    "task_options",
]
