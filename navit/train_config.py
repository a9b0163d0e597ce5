"""The training configuration: nested sections, one name per option in YAML, CLI and API.

``config.yaml`` in a run folder is :meth:`TrainConfig.to_dict`: one mapping per section
(``model``, ``task``, ``data``, ``packing``, ``optim``, ``eval``, ``run``). Every option also has
a flat name, used as its command-line flag and accepted at the top level of a YAML file:
``lr: 1e-3`` means ``optim: {lr: 1e-3}``. The flat name is the field name, except for the few in
:data:`FLAT_NAMES` (``--model`` is ``model.name``, ``--data`` is ``data.train``). The ``task``
section holds the chosen task's own options (:mod:`navit.tasks`).

Each section is declared, with its defaults and its own checks, next to the code that reads it:
``model`` in :mod:`navit.start`, ``data``, ``packing`` and ``eval`` in :mod:`navit.train_data`,
``optim`` in :mod:`navit.optim`, ``run`` in :mod:`navit.run_folder`; this module gathers them and
checks what spans sections.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from navit.config import option
from navit.optim import OptimSection
from navit.run_folder import RunSection
from navit.start import ModelSection
from navit.tasks import TASKS, Task
from navit.train_data import DataSection, EvalSection, PackingSection


@dataclass
class TaskSection:
    name: str = option("classify", "what to train: the task's head, targets, loss and metric")
    options: Any = None  # the task's Options dataclass

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.options)}

    def build(self, class_names: list[str]) -> Task:
        """The task, with its options, for data of ``class_names``."""
        return TASKS[self.name](self.options, list(class_names))


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "packing": PackingSection,
    "optim": OptimSection,
    "eval": EvalSection,
    "run": RunSection,
}
#: Flat names (flags) that differ from the field name.
FLAT_NAMES = {("model", "name"): "model", ("model", "args"): "model_args", ("data", "train"): "data",
              ("data", "val"): "val_data", ("task", "name"): "task"}  # fmt: skip
#: Recipes (``--recipe``): options for a kind of data, by flat name.
RECIPES: dict[str, dict[str, Any]] = {
    # A few hundred real clips told apart by motion (docs/video.md): every training clip long
    # enough to show motion (two tubelets), a gentler peak learning rate, and more passes.
    "small-video": {"frames_min": 4, "lr": 5e-4, "epochs": 40},
}
#: Old names, for a helpful error.
RENAMED = {"seqs_per_batch": "num_seqs", "max_images_per_seq": "max_examples_per_seq", "eval_budgets": "budgets",
           "max_seq_len": "seq_len", "min_res": "res_min", "max_res": "res_max"}  # fmt: skip


def flat_options() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every option's flat name -> (section, field). Task options come from every task."""
    options: dict[str, tuple[str, dataclasses.Field]] = {}
    fields = [(s, f) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    fields += [("task", TaskSection.__dataclass_fields__["name"])]
    fields += [("task", f) for task in TASKS.values() for f in dataclasses.fields(task.Options)]
    for section, f in fields:
        flat = FLAT_NAMES.get((section, f.name), f.name)
        if flat in options and options[flat][0] != section:
            raise AssertionError(f"option {flat!r} is defined in sections {options[flat][0]} and {section}")
        options.setdefault(flat, (section, f))
    return options


def recipe_options(values: dict[str, Any]) -> dict[str, Any]:
    """The options of the recipe ``values`` names (flat ``recipe`` or ``data: {recipe: ...}``), or {}."""
    data = values.get("data")
    name = values.get("recipe", data.get("recipe") if isinstance(data, dict) else None)
    if name is None:
        return {}
    if name not in RECIPES:
        raise ValueError(f"recipe={name!r}; expected one of {tuple(RECIPES)}")
    return RECIPES[name]


def _unknown(key: str, known: list[str]) -> ValueError:
    if key in RENAMED:
        return ValueError(f"option {key!r} is now called {RENAMED[key]!r}")
    close = difflib.get_close_matches(key, known, n=1)
    return ValueError(f"unknown option {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``config.yaml`` in the run folder."""

    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=lambda: TaskSection("classify", TASKS["classify"].Options()))
    data: DataSection = field(default_factory=DataSection)
    packing: PackingSection = field(default_factory=PackingSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        """Each section checks its own options when it is made; here, what spans sections, so an
        impossible setting fails before any work starts."""
        data, model = self.data, self.model_config()
        recipe_options({"recipe": data.recipe})
        if data.max_tokens > self.packing.seq_len:
            raise ValueError(f"max_tokens={data.max_tokens} exceeds seq_len={self.packing.seq_len}")
        if self.optim.max_flops and data.drop != "none" and data.drop_schedule != "constant":
            raise ValueError(f"drop_schedule={data.drop_schedule!r} follows the examples of the run, which max_flops "
                             "does not fix: give epochs instead")  # fmt: skip
        if data.res_mode != "native" and data.res_min < model.patch_size:
            raise ValueError(
                f"res_min={data.res_min} px is smaller than the patch size {model.patch_size}: "
                "such images would be a fraction of one patch; raise res_min"
            )

    def model_config(self):
        """The model's :class:`~navit.NaViTConfig`: the preset with ``model.args`` on top."""
        return self.model.config()

    # -- reading and writing ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        return {"model": out.pop("model"), "task": self.task.to_dict(), **out}

    def flat(self) -> dict[str, Any]:
        """Every option by its flat name."""
        nested = self.to_dict()
        return {flat: nested[section][f.name] for flat, (section, f) in flat_options().items()
                if f.name in nested[section]}  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """From nested sections and/or flat option names (flat ones win over nested ones)."""
        options = flat_options()
        nested: dict[str, dict[str, Any]] = {name: {} for name in [*SECTIONS, "task"]}
        flat = {}
        for key, value in values.items():
            if key in nested and isinstance(value, dict):
                nested[key].update(value)
            elif key in options:
                flat[key] = value
            else:
                raise _unknown(key, sorted([*options, *nested]))
        for key, value in recipe_options(values).items():  # under every option given, flat or nested
            if key not in flat and options[key][1].name not in nested[options[key][0]]:
                flat[key] = value
        for key, value in flat.items():
            section, f = options[key]
            nested[section][f.name] = value
        task_values = dict(nested.pop("task"))
        task_name = task_values.pop("name", "classify")
        if task_name not in TASKS:
            raise ValueError(f"task={task_name!r}; expected one of {tuple(TASKS)}")
        task_cls = TASKS[task_name]
        own = {f.name for f in dataclasses.fields(task_cls.Options)}
        for key in task_values:
            if key not in own:
                owners = [t for t, c in TASKS.items() if key in {f.name for f in dataclasses.fields(c.Options)}]
                if owners:
                    raise ValueError(f"{key} is an option of task {' / '.join(owners)}, not of {task_name!r}")
                raise _unknown(key, sorted(own))
        sections = {}
        for name, section_cls in SECTIONS.items():
            for key in nested[name]:
                if key not in {f.name for f in dataclasses.fields(section_cls)}:
                    raise _unknown(key, sorted(options))
            sections[name] = section_cls(**nested[name])
        return cls(task=TaskSection(task_name, task_cls.options_from_dict(task_values)), **sections)

    def with_options(self, values: dict[str, Any]) -> "TrainConfig":
        """A copy with ``values`` (nested sections and/or flat names) on top; ``model_args``
        merges into the model's args; another task starts from its own default options; a
        recipe named in ``values`` goes on first, under them."""
        recipe = recipe_options(values)
        return (self._with(recipe) if recipe else self)._with(values)

    def _with(self, values: dict[str, Any]) -> "TrainConfig":
        merged = self.to_dict()
        flat = {}
        for key, value in values.items():
            if key in merged and isinstance(value, dict):
                merged[key] = {**merged[key], **value}
            else:
                flat[key] = value
        if "model_args" in flat:
            flat["model_args"] = {**merged["model"]["args"], **dict(flat["model_args"])}
        task = flat.get("task", merged["task"]["name"])
        if task != self.task.name:
            given = values["task"] if isinstance(values.get("task"), dict) else {}
            merged["task"] = {k: v for k, v in merged["task"].items() if k == "name" or k in given}
        return TrainConfig.from_dict({**merged, **flat})
