"""The training configuration: nested sections, one name per option in YAML, CLI and API.

``config.yaml`` in a run folder is :meth:`TrainConfig.to_dict`: one mapping per section
(``model``, ``task``, ``data``, ``packing``, ``optim``, ``eval``, ``run``). Every option also has
a flat name, used as its command-line flag and accepted at the top level of a YAML file:
``lr: 1e-3`` means ``optim: {lr: 1e-3}``. The flat name is the field name, except for the few in
:data:`FLAT_NAMES` (``--model`` is ``model.name``, ``--data`` is ``data.train``). The ``task``
section holds the chosen task's own options (:mod:`navit.tasks`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from navit import distributed as D
from navit.config import check_choices, check_numbers, list_models, option, resolve_config
from navit.data.loader import DropSchedule
from navit.data.transforms import RES_DISTS, RES_MODES, ResolutionSampler
from navit.tasks import TASKS
from navit.token_drop import BetaRate, ConstantRate, ResolutionRate, TokenDropper, UniformRate

DROP_KINDS = ("none", "constant", "uniform", "beta", "resolution")
DATA_FORMS = (
    "synthetic[:N[:SEED]] (built-in shapes; synthetic-hard, synthetic-video, synthetic-seg likewise), a folder with one "
    "sub-folder per class (segmentation: images/ and masks/), a .csv/.jsonl manifest (path,label[,caption]; "
    "segmentation: path,mask) or .tar shards (a file, a glob or a {000..009} range)"
)


@dataclass
class ModelSection:
    name: str = option("navit_mini16", f"model preset: {', '.join(list_models())}")
    args: dict[str, Any] = option({}, "model config fields to override, KEY=VALUE (e.g. depth=6 rope=true)")
    baseline: str = option("navit", "navit: native aspect ratio (and duration); square: the ViT baseline, every "
                           "image squashed to a square grid of the same mean token count; frame: clips seen as one "
                           "frame each", choices=("navit", "square", "frame"))  # fmt: skip
    square_tokens: int | None = option(None, "square baseline: tokens per image, a square number (default: the "
                                       "square grid nearest the mean token count at native aspect ratio)")  # fmt: skip
    init_from: str | None = option(None, "run or checkpoint to start from (fine-tuning), or a pretrained model: a "
                                   "Hugging Face SigLIP2 folder, a timm NaFlexViT folder or weights file; every "
                                   "weight whose name and shape match is loaded")  # fmt: skip
    init_arch: str | None = option(None, "timm model name of a bare timm weights file given to --init-from, e.g. "
                                   "naflexvit_base_patch16_gap (a timm folder's config.json names it)")  # fmt: skip


@dataclass
class DataSection:
    train: str = option("synthetic:5000", f"training data: {DATA_FORMS}")
    val: str | None = option(None, "validation data (same forms); default: a stratified split of the training data")
    val_fraction: float = option(0.2, "share of the training data held out for validation when --val-data is not given")
    split_seed: int = option(0, "seed of that held-out split (kept apart from --seed, so runs of several seeds "
                             "are measured on the same validation images)")  # fmt: skip
    max_tokens: int = option(64, "most tokens of one example in training and native-resolution evaluation; "
                             "larger images are scaled down, aspect kept")  # fmt: skip
    res_mode: str = option("native", "resolution sampling: native (as is), side (sample the side) or area "
                           "(sample the area)", choices=RES_MODES)  # fmt: skip
    res_min: int = option(64, "smallest sampled side in pixels (res_mode side/area)")
    res_max: int = option(256, "largest sampled side in pixels (res_mode side/area)")
    res_dist: str = option("truncnorm", "distribution of sampled sides: uniform, or a normal biased to low "
                           "resolution truncated to the range", choices=RES_DISTS)  # fmt: skip
    res_mean: float = option(0.0, "centre of the truncated normal as a share of the range (0: res_min, "
                             "0.5: the middle, 1: res_max); its spread is half the range")  # fmt: skip
    fps: float | None = option(None, "clips: frames per second to sample, by the timestamps of decoded frames "
                               "(default: every frame)")  # fmt: skip
    frame_stride: int = option(1, "clips: then keep every n-th of those frames")
    max_frames: int = option(16, "clips: most frames per clip in training, and the frames taken at evaluation")
    frames_min: int = option(1, "clips: fewest frames per clip in training (drawn uniformly up to max_frames)")
    crop_min: float = option(1.0, "random crops keep at least this share of the area (1: no cropping)")
    flip: bool = option(True, "random horizontal flips in training")
    drop: str = option("none", "token dropping: none, constant rate, uniform, beta-distributed or "
                       "resolution-dependent rates", choices=DROP_KINDS)  # fmt: skip
    drop_rate: float = option(0.25, "drop rate (constant) or mean rate (beta)")
    drop_max: float = option(0.5, "largest drop rate (uniform, beta); resolution: the mean rate at max_tokens "
                             "(the mean grows from 0 at 16 tokens; rates are drawn around it, up to 0.9)")  # fmt: skip
    drop_schedule: str = option("constant", "how the drop rates move over training", choices=DropSchedule.KINDS)
    drop_schedule_start: float = option(1.0, "multiplier of the drop rates at the start of training")
    drop_schedule_end: float = option(1.0, "multiplier of the drop rates at the end of training (linear, sigmoid)")
    drop_tube: bool = option(False, "clips: drop whole tubes (the same row and column at every time)")
    workers: int = option(1, "data-loader worker processes")
    fail_fast: bool = option(False, "stop at the first unreadable file instead of skipping and counting it")


@dataclass
class PackingSection:
    seq_len: int = option(256, "tokens per packed sequence")
    num_seqs: int = option(4, "sequences per batch")
    max_examples_per_seq: int = option(32, "most examples in one sequence (pooling slots)")
    buffer_size: int = option(128, "examples the loader holds before it packs a batch")


@dataclass
class OptimSection:
    epochs: float = option(10, "passes over the training examples (with token dropping too)")
    max_steps: int | None = option(None, "stop after this many steps instead (and schedule the learning rate over them)")
    max_flops: float | None = option(None, "stop after this many training FLOPs instead (over all ranks, as the "
                                     "model counts them; the learning rate is scheduled over them)")  # fmt: skip
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    min_lr: float = option(1e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = option(0.05, "AdamW weight decay (not on the parameters the model exempts)")
    warmup_steps: int = option(100, "steps of linear warm-up")
    grad_clip: float = option(1.0, "gradient-norm clipping")
    precision: str = option("fp32", "fp32, or bf16 autocast", choices=("fp32", "bf16"))
    compile: bool = option(False, "torch.compile the model")


@dataclass
class EvalSection:
    budgets: list[int] = option([16, 36, 64], "tokens per example to evaluate at after training, besides native")
    frames: list[int] = option([1, 4, 16], "clips: frames per clip to evaluate at after training, besides native")


@dataclass
class RunSection:
    seed: int = option(0, "seed of the data split, order, augmentation and initialisation")
    out: str = option("runs", "folder that holds run folders")
    name: str | None = option(None, "run folder name (default: <baseline>-<date>-<time>)")
    resume: str | None = option(None, "run or checkpoint to continue: its own config, with any options given on top")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    threads: int | None = option(None, "torch threads (default: the cores the loader workers leave free)")
    log_every: int = option(10, "steps between metric records")
    save_every: int = option(200, "steps between checkpoints")
    nan_policy: str = option("stop", "on a non-finite loss: stop the run, or skip the step", choices=("stop", "skip"))
    distributed: str = option("ddp", "under torchrun: ddp (replicated) or fsdp (FSDP2, sharded)", choices=D.STRATEGIES)


@dataclass
class TaskSection:
    name: str = option("classify", "what to train: the task's head, targets, loss and metric")
    options: Any = None  # the task's Options dataclass

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.options)}


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
        """Check every option and build the small parts now, so an impossible setting fails
        before any work starts."""
        for name in SECTIONS:
            check_choices(getattr(self, name), "")
            check_numbers(getattr(self, name))
        data, packing, optim = self.data, self.packing, self.optim
        for name in ("lr", "grad_clip"):
            if getattr(optim, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(optim, name)}")
        for name in ("min_lr", "weight_decay", "warmup_steps"):
            if getattr(optim, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(optim, name)}")
        if not 0 < data.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {data.val_fraction}")
        if data.max_tokens > packing.seq_len:
            raise ValueError(f"max_tokens={data.max_tokens} exceeds seq_len={packing.seq_len}")
        if any(b < 1 for b in self.eval.budgets + self.eval.frames):
            raise ValueError(f"budgets {self.eval.budgets} and frames {self.eval.frames} must be >= 1")
        if not 1 <= data.frames_min <= data.max_frames:
            raise ValueError(f"frames_min={data.frames_min} must be in [1, max_frames={data.max_frames}]")
        if data.fps is not None and data.fps <= 0:
            raise ValueError(f"fps must be > 0, got {data.fps}")
        positive = [(data, "max_tokens"), (data, "workers"), (packing, "seq_len"), (packing, "num_seqs"),
                    (packing, "max_examples_per_seq"), (packing, "buffer_size"), (data, "frame_stride"), (self.run, "log_every"),
                    (self.run, "save_every")]  # fmt: skip
        for section, name in positive:
            if getattr(section, name) < (0 if name == "workers" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'workers' else 1}, got {getattr(section, name)}")
        if optim.epochs <= 0 and not (optim.max_steps or optim.max_flops):
            raise ValueError(f"epochs must be > 0, got {optim.epochs}")
        if optim.max_steps and optim.max_flops:
            raise ValueError("give max_steps or max_flops, not both")
        if optim.max_flops is not None and optim.max_flops <= 0:
            raise ValueError(f"max_flops must be > 0, got {optim.max_flops}")
        if optim.max_flops and data.drop != "none" and data.drop_schedule != "constant":
            raise ValueError(f"drop_schedule={data.drop_schedule!r} follows the examples of the run, which max_flops "
                             "does not fix: give epochs instead")  # fmt: skip
        square = self.model.square_tokens
        if square is not None and (square < 1 or math.isqrt(square) ** 2 != square):
            raise ValueError(f"square_tokens={square} must be a square number (e.g. 16, 36, 64)")
        if square is not None and self.model.baseline != "square":
            raise ValueError(f"square_tokens={square} sizes the square baseline: add --baseline square")
        model = self.model_config()
        resolution = self.resolution()
        if resolution.res_mode != "native" and resolution.res_min < model.patch_size:
            raise ValueError(
                f"res_min={data.res_min} px is smaller than the patch size {model.patch_size}: "
                "such images would be a fraction of one patch; raise res_min"
            )
        self.dropper()
        self.drop_schedule()

    # -- the parts the options describe ----------------------------------------------------------
    def model_config(self):
        """The model's :class:`~navit.NaViTConfig`: the preset with ``model.args`` on top."""
        return resolve_config(self.model.name, **self.model.args)

    def resolution(self) -> ResolutionSampler:
        d = self.data
        return ResolutionSampler(d.res_mode, d.res_min, d.res_max, d.res_dist, d.res_mean)

    def dropper(self) -> TokenDropper | None:
        d = self.data
        rates = {
            "none": None,
            "constant": lambda: ConstantRate(d.drop_rate),
            "uniform": lambda: UniformRate(0.0, d.drop_max),
            "beta": lambda: BetaRate(d.drop_rate, d.drop_max),
            "resolution": lambda: ResolutionRate(0.0, d.drop_max, min(16, d.max_tokens - 1), d.max_tokens),
        }[d.drop]
        return None if rates is None else TokenDropper(rates(), seed=self.run.seed, tube=d.drop_tube)

    def drop_schedule(self) -> DropSchedule:
        return DropSchedule(self.data.drop_schedule, self.data.drop_schedule_start, self.data.drop_schedule_end)

    def total_examples(self, train_size: int) -> int:
        """Examples the run trains on: ``epochs`` passes over ``train_size`` examples."""
        return math.ceil(self.optim.epochs * train_size)

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
        merges into the model's args; another task starts from its own default options."""
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
