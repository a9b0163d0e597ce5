"""The ``navit`` command: train | eval | predict | data synth.

Training options come from :class:`navit.train.TrainConfig`: defaults, then a YAML file
(``--config``), then command-line flags, each overriding the one before.
"""

from __future__ import annotations

import argparse
import dataclasses
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
        return {"nargs": "+", "type": typing.get_args(hint)[0]}
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


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    from navit.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            help=f"(default: {getattr(defaults, f.name)!r})",
            **_flag_type(hints[f.name]),
        )


def load_yaml_config(path: str) -> dict[str, Any]:
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"navit: cannot read config {path}: {error}") from error
    if not isinstance(values, dict):
        raise SystemExit(f"navit: config {path} must be a mapping of option: value")
    return values


def cmd_train(args: argparse.Namespace) -> int:
    from navit.train import TrainConfig, train

    values = load_yaml_config(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    if "model_args" in flags:
        flags["model_args"] = {**values.get("model_args", TrainConfig().model_args), **dict(flags["model_args"])}
    values.update(flags)
    try:
        cfg = TrainConfig.from_dict(values)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"navit train: {error}") from error
    try:
        summary = train(cfg)
    except (ValueError, FileNotFoundError) as error:  # bad data or options: say what, no traceback
        raise SystemExit(f"navit train: {error}") from error
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"\nvalidation accuracy (native resolution): {100 * summary['val_accuracy']:.2f}%")
        print(f"run folder: {summary['run_folder']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from navit.data.sources import open_source, split_holdout
    from navit.evaluate import evaluate_budgets, write_budget_report
    from navit.inference import load_model
    from navit.train import TrainConfig, pick_device

    device = pick_device(args.device)
    model, meta = load_model(args.checkpoint, device)
    run = Path(args.checkpoint)
    cfg_path = run / "config.yaml"
    train_cfg = TrainConfig.from_dict(load_yaml_config(str(cfg_path))) if cfg_path.exists() else TrainConfig()
    if args.data:
        source = open_source(args.data)
    else:  # the run's own validation split
        data = train_cfg.val_data or train_cfg.data
        source = open_source(data)
        if not train_cfg.val_data:
            source = split_holdout(source, train_cfg.val_fraction, train_cfg.seed)[1]
    budgets = args.budgets or train_cfg.eval_budgets
    results = evaluate_budgets(
        model,
        source,
        patch_size=meta["patch_size"],
        max_tokens=meta["max_tokens"],
        budgets=budgets,
        square=bool(meta.get("square_tokens")),
        native_square_tokens=meta.get("square_tokens"),
        seq_len=max([train_cfg.seq_len, *budgets]),
        device=device,
        workers=args.workers,
    )
    out = Path(args.out) if args.out else (run if run.is_dir() else Path("."))
    out.mkdir(parents=True, exist_ok=True)
    write_budget_report(results, out, title=str(args.checkpoint))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from navit.inference import load_model, predict_files

    model, meta = load_model(args.checkpoint, args.device)
    failures = 0
    for result in predict_files(model, meta, args.images, topk=args.topk, budget=args.budget):
        if result.error:
            failures += 1
            print(f"{result.path}: ERROR {result.error}", file=sys.stderr)
            continue
        labels = ", ".join(f"{name} {100 * p:.1f}%" for name, p in result.labels)
        print(f"{result.path} ({result.tokens} tokens): {labels}")
    return 1 if failures else 0


def cmd_synth(args: argparse.Namespace) -> int:
    from navit.data.synthetic import SyntheticShapes, write_image_folder

    source = SyntheticShapes(num_images=args.num_images, seed=args.seed)
    write_image_folder(source, args.out)
    print(f"wrote {len(source)} images in {len(source.class_names)} classes to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="navit", description="NaViT: ViTs at native resolution.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (defaults: small NaViT on built-in data)")
    train.add_argument("--config", help="YAML file of training options (flags override it)")
    _add_train_flags(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="accuracy at several token budgets, with a plot")
    evaluate.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    evaluate.add_argument("--data", help="data to evaluate on (default: the run's validation split)")
    evaluate.add_argument("--budgets", type=int, nargs="+", help="tokens per image to evaluate at")
    evaluate.add_argument("--out", help="folder for eval.json and the plot (default: the run folder)")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--workers", type=int, default=2)
    evaluate.set_defaults(func=cmd_eval)

    predict = sub.add_parser("predict", help="top-k labels for image files")
    predict.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--topk", type=int, default=5)
    predict.add_argument("--budget", type=int, help="tokens per image (default: native resolution)")
    predict.add_argument("--device", default="cpu")
    predict.set_defaults(func=cmd_predict)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the built-in dataset as an image folder")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--num-images", type=int, default=3000)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
