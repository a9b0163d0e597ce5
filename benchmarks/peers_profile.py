"""The profile section of ``peers.py``: ``torch.profiler`` of one training and inference step per
implementation, by op, with navit's modules and attention calls labelled."""

from __future__ import annotations

import contextlib

import torch

import navit
from navit.attention import BucketedBackend, DenseBackend
from peer_models import Impl
from peers_timing import make_infer_fn, make_train_fn

# navit's modules labelled in the profile, by class name (wherever in navit they are defined).
LABELLED = ("Attention", "Mlp", "MAPPool", "MeanPool", "FactorizedPosEmbed")


@contextlib.contextmanager
def navit_ranges(models: dict):
    """Label navit's modules and attention calls in the profiler without editing navit:
    forward hooks open/close record_function ranges; backend methods are wrapped in place."""
    from torch.autograd.profiler import record_function

    handles, stacks = [], {}

    def pre(name):
        def hook(module, inputs):
            ctx = record_function(name)
            ctx.__enter__()
            stacks.setdefault(id(module), []).append(ctx)
        return hook

    def post(module, inputs, output):
        stacks[id(module)].pop().__exit__(None, None, None)

    for model in models.values():
        if not isinstance(model, navit.NaViT):
            continue
        for module in model.modules():
            kind = type(module)
            if kind.__name__ in LABELLED and kind.__module__.startswith("navit."):
                handles.append(module.register_forward_pre_hook(pre(f"navit::{kind.__name__}")))
                handles.append(module.register_forward_hook(post))
    originals = []

    def wrap(cls, meth):
        fn = getattr(cls, meth)

        def wrapped(self, *a, **k):
            with record_function(f"navit::{cls.__name__}.{meth}"):
                return fn(self, *a, **k)

        originals.append((cls, meth, fn))
        setattr(cls, meth, wrapped)

    for cls in (BucketedBackend, DenseBackend):
        for meth in ("prepare", "attend"):
            wrap(cls, meth)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for cls, meth, fn in originals:
            setattr(cls, meth, fn)


def run_profile(mix: str, impls: dict[str, Impl], models: dict, prepared: dict, args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    # On a GPU the kernels' own time is what matters; on CPU the ops' self time.
    self_time = "self_device_time_total" if args.device.type == "cuda" else "self_cpu_time_total"

    out = {}
    keys = [k for k in impls if k in args.profile_impls]
    threads = args.profile_threads or args.threads
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    for mode in ("train", "infer"):
        for key in keys:
            maker = make_train_fn if mode == "train" else make_infer_fn
            fn = maker(impls[key], models[key], prepared[key], args)
            fn()  # warm
            with navit_ranges({key: models[key]}):
                with profile(activities=activities, record_shapes=False) as prof:
                    for _ in range(args.profile_steps):
                        fn()
            events = prof.key_averages()
            total_us = sum(getattr(e, self_time) for e in events)
            table = events.table(sort_by=self_time, row_limit=40)
            ranges = sorted(
                [e for e in events if e.key.startswith("navit::")], key=lambda e: -e.cpu_time_total
            )
            path = args.out.parent / f"peers_profile_{mix}_{mode}_{key}.txt"
            path.write_text(
                f"# {key}, {mode} step, mix {mix}, {args.profile_steps} steps, {threads} threads\n"
                f"# total self CPU: {total_us / 1e3 / args.profile_steps:.1f} ms/step\n\n{table}\n\n"
                "# navit ranges (forward only for modules; cpu_time_total incl. children)\n"
                + "\n".join(f"{e.key:45s} {e.cpu_time_total / 1e3 / args.profile_steps:9.2f} ms/step "
                            f"x{e.count // args.profile_steps}" for e in ranges)
                + "\n"
            )
            top = sorted(events, key=lambda e: -getattr(e, self_time))[: args.profile_top]
            out[f"{mode}/{key}"] = {
                "total_self_ms_per_step": total_us / 1e3 / args.profile_steps,
                "top_ops": [
                    {"op": e.key, "self_ms_per_step": getattr(e, self_time) / 1e3 / args.profile_steps,
                     "share": getattr(e, self_time) / total_us if total_us else 0.0,
                     "calls_per_step": e.count / args.profile_steps}
                    for e in top
                ],
                "navit_ranges": [
                    {"range": e.key, "total_ms_per_step": e.cpu_time_total / 1e3 / args.profile_steps,
                     "calls_per_step": e.count / args.profile_steps}
                    for e in ranges
                ],
                "table_file": path.name,
            }
            print(f"  profile {mix}/{mode}/{key}: {total_us / 1e3 / args.profile_steps:.0f} ms/step -> {path.name}",
                  flush=True)
    torch.set_num_threads(old_threads)
    return out
