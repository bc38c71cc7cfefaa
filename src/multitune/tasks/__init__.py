"""Task registry: an explicit dict from built-in task name to its defaults, plus the three task kinds.

A task in the config either names a built-in (any field given overrides its default) or declares a
new one with ``type`` and ``dataset``.
"""

from __future__ import annotations

from multitune.config import Config, TaskConfig
from multitune.errors import UserError
from multitune.tasks import banking77, chat, claims, commonsense_qa
from multitune.tasks.base import Example, Task
from multitune.tasks.kinds import ChatTask, ClassificationTask, MultipleChoiceTask

BUILTIN: dict[str, dict] = {
    "claims": claims.DEFAULTS,
    "banking77": banking77.DEFAULTS,
    "commonsense_qa": commonsense_qa.DEFAULTS,
    "chat": chat.DEFAULTS,
}
KINDS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "multiple_choice": MultipleChoiceTask,
    "chat": ChatTask,
}


def resolve_spec(cfg: TaskConfig) -> TaskConfig:
    """The task's full spec: built-in defaults overlaid with what the config set explicitly."""
    if cfg.name in BUILTIN:
        explicit = {k: v for k, v in cfg.model_dump(include=cfg.model_fields_set).items() if v is not None}
        return TaskConfig.model_validate({**BUILTIN[cfg.name], **explicit})
    if cfg.type is None or cfg.dataset is None:
        raise UserError(
            f"unknown task {cfg.name!r}: built-in tasks are {sorted(BUILTIN)}; "
            "to declare a new one give it `type` (classification, multiple_choice, chat) and `dataset`"
        )
    return cfg


def resolve_tasks(cfg: Config) -> Config:
    """The config with every task spelled out in full, as written to the run directory."""
    return cfg.model_copy(update={"tasks": [resolve_spec(t) for t in cfg.tasks]})


def build_task(cfg: TaskConfig) -> Task:
    spec = resolve_spec(cfg)
    return KINDS[spec.type](spec)


__all__ = ["BUILTIN", "KINDS", "Example", "Task", "build_task", "resolve_spec", "resolve_tasks"]
