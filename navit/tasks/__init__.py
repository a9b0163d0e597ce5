"""Tasks as plug-ins: each owns its head, targets, loss, metric and prediction output.

Adding a task is a module with a :class:`~navit.tasks.base.Task` subclass and one line here;
the training loop, the loader and the CLI (whose task flags come from each task's ``Options``)
need no change.
"""

from __future__ import annotations

from typing import Any

from navit.tasks.base import Task, TaskLoss
from navit.tasks.classify import Classification
from navit.tasks.contrastive import Contrastive
from navit.tasks.detect import Detection
from navit.tasks.segment import Segmentation

TASKS: dict[str, type[Task]] = {
    Classification.name: Classification,
    Contrastive.name: Contrastive,
    Segmentation.name: Segmentation,
    Detection.name: Detection,
}


def register_task(cls: type[Task]) -> type[Task]:
    """Make a task available by its ``name`` (``--task NAME``); usable as a class decorator."""
    TASKS[cls.name] = cls
    return cls


def get_task(name: str, options: dict[str, Any] | None = None, class_names: list[str] | None = None) -> Task:
    """The task ``name`` with its options (a dict of the task's option fields)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    cls = TASKS[name]
    return cls(cls.options_from_dict(options or {}), class_names)


def task_of(model: Any) -> str:
    """The name of the task whose models are of ``model``'s class, or the nearest of its bases."""
    for base in type(model).__mro__:
        for name, cls in TASKS.items():
            if base is cls.model_class:
                return name
    raise ValueError(f"no task builds a {type(model).__name__}; pass the task (a name or a Task) to save_model")


__all__ = ["TASKS", "Task", "TaskLoss", "get_task", "register_task", "task_of"]
