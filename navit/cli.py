"""The ``navit`` command: train | eval | predict | experiment | data synth | data check | data shard.

Training options come from :class:`navit.train_config.TrainConfig`: defaults, then a YAML file
(``--config``), then command-line flags, each overriding the one before. ``--resume`` starts from
the resumed run's own config instead of the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import yaml


def _flag_type(hint: Any) -> dict[str, Any]:
    """argparse keywords for a dataclass field's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is list:
        return {"nargs": "*", "type": typing.get_args(hint)[0], "metavar": "N"}
    if origin is dict:
        return {"nargs": "+", "type": _key_value, "metavar": "KEY=VALUE"}
    if args and origin is not None:  # Optional[X]
        return {"type": args[0]}
    return {"type": hint}


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _with_default(text: str, default: Any) -> str:
    return text if "default" in text else f"{text} (default: {default!r})"


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option of every config section and every task, with its help and choices."""
    from navit.tasks import TASKS
    from navit.train_config import SECTIONS, TrainConfig, flat_options

    defaults = TrainConfig().flat()
    order = ["model", "task", *(name for name in SECTIONS if name != "model")]
    groups = {name: parser.add_argument_group(f"{name} options") for name in order}
    for flat, (section, f) in flat_options().items():
        if section != "task":
            hint = typing.get_type_hints(SECTIONS[section])[f.name]
            text, choices = _with_default(f.metadata["help"], defaults[flat]), f.metadata["choices"]
        elif f.name == "name":
            hint, text, choices = str, _with_default(f.metadata["help"], defaults[flat]), tuple(TASKS)
        else:  # an option of one or more tasks: each says what it means there
            owners = [cls for cls in TASKS.values() if f.name in cls.Options.__dataclass_fields__]
            fields = [cls.Options.__dataclass_fields__[f.name] for cls in owners]
            hint = typing.get_type_hints(owners[0].Options)[f.name]
            text = "; ".join(f"task {cls.name}: " + _with_default(g.metadata["help"], getattr(cls.Options(), f.name))
                             for cls, g in zip(owners, fields))  # fmt: skip
            choices = sorted({c for g in fields for c in g.metadata["choices"] or ()}) or None
        kwargs = _flag_type(hint) | ({"choices": choices} if choices else {})
        groups[section].add_argument("--" + flat.replace("_", "-"), dest=flat, default=argparse.SUPPRESS,
                                     help=text.replace("%", "%%"), **kwargs)  # fmt: skip


def load_yaml_config(path: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"navit: cannot read config {path}: {error}") from error
    if not isinstance(values, dict):
        raise SystemExit(f"navit: config {path} must be a mapping of option: value")
    return values


def resumed_config(path: str):
    """The config a run was trained with, from its checkpoint (or its ``config.yaml``)."""
    from navit.checkpoint import load_meta, resolve_checkpoint
    from navit.run_folder import run_folder_of
    from navit.train_config import TrainConfig

    meta = load_meta(resolve_checkpoint(path))
    if "config" in meta:
        return TrainConfig.from_dict(meta["config"])
    return TrainConfig.from_dict(load_yaml_config(str(run_folder_of(path) / "config.yaml")))


def training_config(args: argparse.Namespace):
    from navit.train_config import TrainConfig

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    if "model_args" in flags:
        flags["model_args"] = dict(flags["model_args"])
    file_values = load_yaml_config(args.config) if args.config else {}
    if "resume" not in flags:
        return TrainConfig().with_options(file_values).with_options(flags)
    base = resumed_config(flags["resume"])
    cfg = base.with_options(file_values).with_options(flags)
    before, after = base.flat(), cfg.flat()
    for name in after:
        if name != "resume" and after[name] != before.get(name):
            print(f"resume: {name} {before.get(name)!r} -> {after[name]!r}")
    return cfg


def cmd_train(args: argparse.Namespace) -> int:
    from navit.train import train

    try:
        cfg = training_config(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise SystemExit(f"navit train: {error}") from error
    try:
        summary = train(cfg)
    except (ValueError, FileNotFoundError) as error:  # bad data or options: say what, no traceback
        raise SystemExit(f"navit train: {error}") from error
    if int(os.environ.get("RANK", "0")) == 0:
        metric = next(k for k in summary if k.startswith("val_"))
        print(f"\nvalidation {metric[4:]} (native resolution): {100 * summary[metric]:.2f}%")
        print(f"run folder: {summary['run_folder']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from navit.data.labels import with_class_names
    from navit.data.registry import open_source
    from navit.evaluate import evaluate_budgets, write_budget_report
    from navit.inference import load_checkpoint
    from navit.run_folder import run_folder_of
    from navit.train import pick_device
    from navit.train_data import open_data
    from navit.train_config import TrainConfig

    try:
        device = pick_device(args.device)
        model, task, meta = load_checkpoint(args.checkpoint, device)
        cfg = TrainConfig.from_dict(meta["config"]) if "config" in meta else None
        if args.data:
            source = with_class_names(open_source(args.data), task.class_names, f"--data {args.data}")
            task.check_eval_data(source, args.data)
        elif cfg is not None:  # the run's own validation split
            source = open_data(cfg)[1]
        else:
            raise ValueError(f"{args.checkpoint} holds no training config to find its validation data; pass --data")
        budgets = args.budgets if args.budgets is not None else (cfg.eval.budgets if cfg else [])
        frames = args.frames if args.frames is not None else (cfg.eval.frames if cfg else [])
        seq_len = cfg.packing.seq_len if cfg else model.processor.max_tokens
        results = evaluate_budgets(
            task.inference_model(model), task, source, model.processor, budgets=budgets, frames=frames, by=args.by,
            seq_len=seq_len, device=device, workers=args.workers,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"navit eval: {error}") from error
    out = Path(args.out) if args.out else run_folder_of(args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    write_budget_report(results, out, title=str(args.checkpoint), metric=task.metric)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from navit.inference import expand_inputs, load_checkpoint, predict_files
    from navit.train import pick_device

    try:
        model, task, _ = load_checkpoint(args.checkpoint, pick_device(args.device))
    except (ValueError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"navit predict: {error}") from error
    if args.threshold is not None:
        if not hasattr(task.options, "threshold"):
            raise SystemExit(f"navit predict: --threshold is for detection models; this one is a {task.name} model")
        task.options = dataclasses.replace(task.options, threshold=args.threshold)
    inference = task.inference_model(model)
    failures = 0
    try:
        results = predict_files(inference, task, expand_inputs(args.inputs), topk=args.topk, budget=args.budget,
                                batch_size=args.batch_size, out=args.out)  # fmt: skip
        for result in results:
            failures += result["error"] is not None
            if args.json:
                print(json.dumps(result), flush=True)
            elif result["error"]:
                print(f"{result['path']}: ERROR {result['error']}", file=sys.stderr)
            elif "boxes" in result:
                boxes = ", ".join(f"{x['label']} {100 * x['score']:.1f}% {x['box']}" for x in result["boxes"])
                print(f"{result['path']} ({result['tokens']} tokens): {boxes or 'no box'}")
            elif "labels" in result:
                labels = ", ".join(f"{x['label']} {100 * x['score']:.1f}%" for x in result["labels"])
                print(f"{result['path']} ({result['tokens']} tokens): {labels}")
            else:
                top = list(result["classes"].items())[: args.topk]
                shares = ", ".join(f"{name} {100 * share:.1f}%" for name, share in top)
                print(f"{result['path']} ({result['tokens']} tokens): {result['mask']}, {result['overlay']}; {shares}")
    except ValueError as error:
        raise SystemExit(f"navit predict: {error}") from error
    return 1 if failures else 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``navit serve``: an HTTP server that packs concurrent requests into token-budget batches."""
    from navit.serve import require_extras

    try:
        require_extras()
    except ImportError as error:
        raise SystemExit(f"navit serve: {error}") from error
    from navit.serve.runner import serve_from_args

    return serve_from_args(args)



def cmd_experiment(args: argparse.Namespace) -> int:
    from navit.experiments import EXPERIMENTS, Setting

    if args.seeds < 1:
        raise SystemExit(f"navit experiment: --seeds must be >= 1, got {args.seeds}")
    setting = Setting(args.data, Path(args.out), quick=args.quick, seeds=args.seeds, val_data=args.val_data)
    try:
        EXPERIMENTS[args.name]().run(setting)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"navit experiment {args.name}: {error}") from error
    return 0


#: ``navit data NAME``: (module, generated set, its writer, what it writes) of each built-in set.
SYNTH_WRITERS = {
    "synth": ("navit.synthetic.shapes", "SyntheticShapes", "write_image_folder", "images"),
    "synth-video": ("navit.synthetic.video", "SyntheticMotion", "write_video_folder", "clips"),
    "synth-seg": ("navit.synthetic.segmentation", "SyntheticSegmentation", "write_segmentation_folder",
                  "images with masks"),
    "synth-det": ("navit.synthetic.detection", "SyntheticDetection", "write_coco_folder",
                  "images with boxes (COCO layout)"),
}


def cmd_synth(args: argparse.Namespace) -> int:
    """A built-in set written out as files (``navit data synth``, ``synth-video``, ``synth-seg``)."""
    import importlib

    module, generated, writer, noun = SYNTH_WRITERS[args.data_command]
    found = importlib.import_module(module)
    source = getattr(found, generated)(args.count, seed=args.seed)
    options = {"ext": args.ext} if "ext" in args else {}
    try:
        getattr(found, writer)(source, args.out, **options)
    except ValueError as error:
        raise SystemExit(f"navit data {args.data_command}: {error}") from error
    print(f"wrote {len(source)} {noun} in {len(source.class_names)} classes to {args.out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Every problem of a data source, one line each (``navit data check``); exit 1 if any."""
    from navit.data.registry import open_source

    try:
        source = open_source(args.source)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"navit data check: {error}") from error
    if hasattr(source, "problems"):  # a source that checks itself (COCO: each annotation)
        problems = [str(problem) for problem in source.problems()]
    else:
        problems = []
        for index in range(len(source)):
            try:
                source.item(index)
            except Exception as error:  # reported per item
                problems.append(f"{source.describe(index)}: {error}")
    for line in problems:
        print(line)
    print(f"{args.source}: {len(source)} item(s), {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def size_bytes(text: str) -> int:
    """argparse type: a size such as 1GB, 500MB, 64kB or a number of bytes."""
    from navit.data.shard_writer import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def cmd_shard(args: argparse.Namespace) -> int:
    """Any source written as WebDataset ``.tar`` shards plus ``index.json`` (``navit data shard``)."""
    from navit.data.registry import open_source
    from navit.data.shard_writer import write_shards

    try:
        summary = write_shards(open_source(args.source), args.out, max_size=args.max_size, max_count=args.max_count,
                               seed=args.seed, shuffle=args.shuffle, prefix=args.prefix, overwrite=args.overwrite,
                               fail_fast=args.fail_fast, spec=args.source)  # fmt: skip
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise SystemExit(f"navit data shard: {error}") from error
    if summary["skipped"]:
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(summary["skipped"].items()))
        print(f"skipped {sum(summary['skipped'].values())} unreadable item(s) ({kinds}); first: "
              + "; ".join(summary["failures"]), file=sys.stderr)  # fmt: skip
    count, shards, size = summary["count"], summary["shards"], summary["bytes"]
    print(f"wrote {count} samples in {shards} shards ({size} bytes) to {summary['out']}")
    return 0


#: ``navit data synth*``: (command, help, count flag, default count) of each built-in set writer.
SYNTH_PARSERS = (
    ("synth", "write the built-in dataset as an image folder", "--num-images", 3000),
    ("synth-video", "write the built-in video set as video files", "--num-clips", 600),
    ("synth-seg", "write the built-in segmentation set as images/, masks/ and classes.txt", "--num-images", 2000),
    ("synth-det", "write the built-in detection set in the COCO layout: images/ and annotations.json", "--num-images", 2000),
)


def _train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a model (defaults: small NaViT on built-in data)",
                           description="Train, evaluate at several token budgets, write a run folder.")  # fmt: skip
    train.add_argument("--config", help="YAML file of options, nested by section or flat (flags override it)")
    _add_train_flags(train)
    train.set_defaults(func=cmd_train)


def _eval_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="the task's metric at several token budgets, with a plot")
    evaluate.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or a file in it")
    evaluate.add_argument("--data", help="data to evaluate on (classes matched to the model's by name; "
                          "default: the run's own validation split)")  # fmt: skip
    evaluate.add_argument("--budgets", type=positive_int, nargs="*", metavar="N",
                          help="tokens per example to evaluate at, besides native (default: the run's)")  # fmt: skip
    evaluate.add_argument("--by", choices=("resize", "drop"), default="resize",
                          help="meet each budget by resizing the input to it, or by dropping all but that many of "
                          "its native tokens at random; not for segmentation (default: resize)")  # fmt: skip
    evaluate.add_argument("--frames", type=positive_int, nargs="*", metavar="N",
                          help="clips: frames per clip to evaluate at, besides native (default: the run's)")  # fmt: skip
    evaluate.add_argument("--out", help="folder for eval.json and the plot (default: the run folder)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    evaluate.add_argument("--workers", type=int, default=2, help="data-loader worker processes (default: 2)")
    evaluate.set_defaults(func=cmd_eval)


def _predict_parser(sub) -> None:
    predict = sub.add_parser("predict", help="top-k labels (or segmentation masks) for image and video files, "
                             "folders or globs")  # fmt: skip
    predict.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or a file in it")
    predict.add_argument("inputs", nargs="+", help="image or video files, folders (searched recursively) or globs")
    predict.add_argument("--topk", type=positive_int, default=5, help="labels (segmentation: classes listed; detection: boxes at most) per input (default: 5)")
    predict.add_argument("--out", help="segmentation: folder for each input's mask PNG (class indices, the input's size) "
                         "and colour overlay PNG; detection: for each input drawn with its boxes, <name>_boxes.png")  # fmt: skip
    predict.add_argument("--threshold", type=float, help="detection: smallest score of a reported box (default: "
                         "the model's, 0.3)")  # fmt: skip
    predict.add_argument("--budget", type=positive_int, help="tokens per input (default: native resolution)")
    predict.add_argument("--batch-size", type=positive_int, default=32, help="inputs per forward pass (default: 32)")
    predict.add_argument("--json", action="store_true",
                         help='one JSON object per input: {"path", "tokens", "error"} and "labels": [{"label", '
                         '"score"}] (segmentation: "mask", "overlay" and "classes": {name: share of pixels}; detection: "boxes": '
                         '[{"label", "score", "box": [x1, y1, x2, y2]}] in the input\'s pixels)')  # fmt: skip
    predict.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    predict.set_defaults(func=cmd_predict)


def _serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="an HTTP inference server that packs concurrent requests by token budget",
                           description="Serve a model over HTTP (/v1/predict, /v1/embeddings, /v1/models, /healthz, "
                           "/metrics), packing the images of concurrent requests into token-budget batches.")  # fmt: skip
    serve.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or file, or a pretrained "
                       "SigLIP2 / timm folder")  # fmt: skip
    serve.add_argument("--arch", help="timm model name, for a bare timm weights file")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--max-batch-tokens", type=positive_int, default=4096,
                       help="tokens (padding included) in one forward (default: 4096)")  # fmt: skip
    serve.add_argument("--max-wait-ms", type=float, default=10.0,
                       help="longest an image waits for its batch to fill (default: 10)")  # fmt: skip
    serve.add_argument("--batching", choices=("packed", "padded", "single"), default="packed",
                       help="packed: first fit by token budget; padded: one image per row, padded to the longest; "
                       "single: one request per forward (default: packed)")  # fmt: skip
    serve.add_argument("--budget", type=positive_int, help="tokens per image unless a request says (default: native)")
    serve.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (default: 32)")
    serve.add_argument("--max-pixels", type=positive_int, default=40_000_000,
                       help="largest image (width x height) (default: 40000000)")  # fmt: skip
    serve.add_argument("--max-images", type=positive_int, default=64, help="inputs per request (default: 64)")
    serve.add_argument("--max-frames", type=positive_int, default=64, help="frames per clip (default: 64)")
    serve.add_argument("--max-queue", type=positive_int, default=512,
                       help="images queued or running; more answer 503 with Retry-After (default: 512)")  # fmt: skip
    serve.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    serve.add_argument("--threads", type=positive_int, help="torch threads of the forwards (default: torch's, the cores)")
    serve.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                       help="uvicorn's log level (default: warning)")  # fmt: skip
    serve.set_defaults(func=cmd_serve)


def _experiment_parser(sub) -> None:
    from navit.experiments import EXPERIMENTS

    experiment = sub.add_parser("experiment", help="reproduce one of the paper's claims: results.json, report.md, plots",
                                description="Train every arm of an experiment on every seed and say whether the paper's "
                                "claim holds here.")  # fmt: skip
    experiment.add_argument("name", choices=sorted(EXPERIMENTS), help="the claim: " + "; ".join(
        f"{name}: {cls.paper}" for name, cls in EXPERIMENTS.items()))  # fmt: skip
    experiment.add_argument("--data", default="synthetic-hard:6000",
                            help="labelled images: a class-folder tree, a manifest, shards or a built-in set "
                            "(default: synthetic-hard:6000)")  # fmt: skip
    experiment.add_argument("--val-data", help="validation data (default: the same 20%% of --data for every run)")
    experiment.add_argument("--out", default="experiments", help="folder for NAME/ (default: experiments)")
    experiment.add_argument("--seeds", type=int, default=2, help="runs of each arm, seeds 0..N-1 (default: 2)")
    experiment.add_argument("--quick", action="store_true", help="a tiny version for tests (its numbers mean nothing)")
    experiment.set_defaults(func=cmd_experiment)


def _data_parser(sub) -> None:
    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    for name, help_text, flag, count in SYNTH_PARSERS:
        synth = data_sub.add_parser(name, help=help_text)
        synth.add_argument("--out", required=True, help="output folder")
        synth.add_argument(flag, dest="count", type=int, default=count, help=f"{flag[6:]} to write (default: {count})")
        synth.add_argument("--seed", type=int, default=0, help="dataset seed (default: 0)")
        if name == "synth-video":
            synth.add_argument("--ext", default=".mp4", choices=(".mp4", ".avi", ".mkv", ".webm", ".mov", ".mpg"),
                               help="container (default: .mp4)")  # fmt: skip
        synth.set_defaults(func=cmd_synth)
    check = data_sub.add_parser("check", help="list every problem of a data source (COCO: each bad annotation, "
                                "named by file and annotation id); exit 1 if any")  # fmt: skip
    check.add_argument("source", metavar="SRC", help="a COCO folder or instances JSON, or any other data source")
    check.set_defaults(func=cmd_check)
    shard = data_sub.add_parser("shard", help="write any data source as WebDataset .tar shards plus index.json",
                                description="Copy every sample of SRC (its files' own bytes; built-in sets as PNG, "
                                "clips as MP4) into uncompressed WebDataset shards OUT/PREFIX-000000.tar, ... and "
                                "OUT/index.json, in a seeded shuffled order.")  # fmt: skip
    shard.add_argument("source", metavar="SRC", help="a class folder, a manifest, a segmentation folder or manifest, "
                       "a COCO detection set, or a built-in set such as synthetic:200")  # fmt: skip
    shard.add_argument("--out", required=True, help="output folder (refused if it already holds shards or index.json)")
    shard.add_argument("--max-size", type=size_bytes, default="1GB",
                       help="close a shard before it would pass this size: 1GB, 500MB, 64kB or bytes; one sample "
                       "bigger than this goes alone into its own shard (default: 1GB)")  # fmt: skip
    shard.add_argument("--max-count", type=positive_int, help="samples per shard at most (default: no limit; "
                       "give one to get more shards than ranks x workers from a small set)")  # fmt: skip
    shard.add_argument("--seed", type=int, default=0, help="seed of the shuffled order (default: 0)")
    shard.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep the source's order")
    shard.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    shard.add_argument("--overwrite", action="store_true", help="replace the shards and index.json already in --out")
    shard.add_argument("--fail-fast", action="store_true",
                       help="stop at the first unreadable item (default: skip it and count it)")  # fmt: skip
    shard.set_defaults(func=cmd_shard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="navit", description="NaViT: ViTs at native resolution.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _eval_parser, _predict_parser, _serve_parser, _experiment_parser, _data_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
