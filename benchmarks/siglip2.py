"""SigLIP2 NaFlex inference: navit packed against the transformers implementation with its processor.

    python benchmarks/siglip2.py                          # base/16 width, 2 threads (~3 min)
    python benchmarks/siglip2.py --device cuda --precision bf16

The same ``Siglip2VisionModel`` (base/16 sizes by default, random weights) runs in transformers on
the batches its own image processor makes (every image padded to ``max_num_patches``, one per row,
a dense mask) and in navit, loaded from the same folder, on packed sequences (navit's processor
gives the same patches; ``--seq-len`` tokens per sequence). Each ``max_num_patches`` setting is a
row pair: images per second for the model alone and with preprocessing, implementations
interleaved in one process, and the peak extra resident memory of one forward (a fresh process
per point). Outputs are compared first: the pooled vectors must agree.

Prints Markdown, writes ``results/siglip2.json``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import hwm_kb, interleaved, reset_hwm, rss_kb, run_parser, summarize, synchronize  # noqa: E402
from packing_padding import sample_sizes  # noqa: E402
from report import fmt, heading, md_table, new_result, write_report  # noqa: E402


def make_images(args):
    from PIL import Image

    rng = np.random.default_rng(args.seed)
    sizes = sample_sizes(args.images, rng, "long", 64, 1024)
    return [Image.fromarray(rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8)) for h, w in sizes]


def make_folder(args) -> Path:
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    folder = Path(tempfile.mkdtemp(prefix="navit_siglip2_"))
    torch.manual_seed(0)
    config = Siglip2VisionConfig(hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.depth,
                                 num_attention_heads=args.width // 64, patch_size=16, num_patches=256)  # fmt: skip
    Siglip2VisionModel(config).eval().save_pretrained(folder)
    return folder


def load_pair(folder: Path, patches: int, device):
    from transformers import Siglip2VisionModel
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

    from navit.pretrained import load_hf

    reference = Siglip2VisionModel.from_pretrained(folder).eval().to(device)
    processor = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=patches)
    model = load_hf(folder).to(device)
    model.processor = model.processor.replace(max_tokens=patches)
    return reference, processor, model


def chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def run_speed(args, folder: Path, images) -> dict:
    device = args.device
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    rows = {}
    for patches in args.max_patches:
        reference, processor, model = load_pair(folder, patches, device)
        hf_inputs = [processor(images=c, return_tensors="pt").to(device) for c in chunks(images, args.batch_images)]
        seq_len = max(args.seq_len, patches)
        batches = [model.processor(c, seq_len=seq_len).to(device) for c in chunks(images, args.batch_images)]
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            ours = torch.cat([model.embed(b) for b in batches]).float()
            theirs = torch.cat([reference(**x).pooler_output for x in hf_inputs]).float()
        agreement = float((ours - theirs).abs().max() / theirs.abs().max())

        def hf_model():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                for x in hf_inputs:
                    reference(**x)
            synchronize(device)

        def navit_model():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                for b in batches:
                    model.embed(b)
            synchronize(device)

        def hf_end_to_end():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                for c in chunks(images, args.batch_images):
                    reference(**processor(images=c, return_tensors="pt").to(device))
            synchronize(device)

        def navit_end_to_end():
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                for c in chunks(images, args.batch_images):
                    model.embed(model.processor(c, seq_len=seq_len).to(device))
            synchronize(device)

        fns = {"transformers": hf_model, "navit": navit_model, "transformers+processor": hf_end_to_end,
               "navit+processor": navit_end_to_end}  # fmt: skip
        times = interleaved(fns, warmup=1, repeats=args.repeats)
        stats = {name: summarize(t) for name, t in times.items()}
        ratio_model = float(np.median([a / b for a, b in zip(times["transformers"], times["navit"])]))
        ratio_e2e = float(np.median([a / b for a, b in zip(times["transformers+processor"], times["navit+processor"])]))
        real = sum(int(x["pixel_attention_mask"].sum()) for x in hf_inputs)
        computed_hf = sum(x["pixel_attention_mask"].numel() for x in hf_inputs)
        computed_navit = sum(b.segment_ids.numel() for b in batches)
        rows[str(patches)] = {
            "agreement": agreement, "stats": stats, "ratio_model": ratio_model, "ratio_end_to_end": ratio_e2e,
            "images_per_s": {k: len(images) / v["median_s"] for k, v in stats.items()},
            "tokens": {"real": real, "transformers": computed_hf, "navit": computed_navit},
        }  # fmt: skip
    return rows


def memory_point(args, impl: str, patches: int) -> int:
    """Peak extra resident memory (kB) of one forward over the first --batch-images images, in a
    fresh process."""
    cmd = [sys.executable, __file__, "--memory-worker", impl, str(patches), "--folder", str(args.folder),
           "--width", str(args.width), "--depth", str(args.depth), "--images", str(args.batch_images),
           "--seq-len", str(args.seq_len), "--seed", str(args.seed), "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def memory_worker(args) -> None:
    impl, patches = args.memory_worker[0], int(args.memory_worker[1])
    images = make_images(args)
    reference, processor, model = load_pair(Path(args.folder), patches, torch.device("cpu"))
    if impl == "transformers":
        inputs = processor(images=images, return_tensors="pt")
        run = lambda: reference(**inputs)  # noqa: E731
    else:
        batch = model.processor(images, seq_len=max(args.seq_len, patches))
        run = lambda: model.embed(batch)  # noqa: E731
    with torch.no_grad():
        run()  # warm up allocations that persist
        before = rss_kb()
        reset_hwm()
        run()
    print(hwm_kb() - before)


def render(res: dict) -> str:
    a = res["args"]
    lines = heading("SigLIP2 NaFlex inference", res) + [
        f"torch {res['machine']['torch']}, transformers {res['transformers']}, {a['threads']} threads, "
        f"{a['device']}, {a['precision']}; width {a['width']}, depth {a['depth']}, {a['images']} images "
        f"(long side 64..1024 px, mixed aspect), {a['batch_images']} per batch; median of {a['repeats']}.", ""]  # fmt: skip
    table = []
    for patches, r in res["speed"].items():
        ips = r["images_per_s"]
        mem = res.get("memory", {}).get(patches, {})
        table.append((patches, f"{r['agreement']:.1e}", fmt(ips["transformers"]), fmt(ips["navit"]),
                      f"{r['ratio_model']:.2f}×", fmt(ips["transformers+processor"]), fmt(ips["navit+processor"]),
                      f"{r['ratio_end_to_end']:.2f}×", f"{r['tokens']['transformers']} / {r['tokens']['navit']}",
                      fmt(mem.get("transformers", 0) / 1024) if mem else "—", fmt(mem.get("navit", 0) / 1024) if mem else "—",
                      "PASS" if r["ratio_model"] >= 2 else "**MISS**"))  # fmt: skip
    lines.append(md_table(["max_num_patches", "pooled max rel. diff", "transformers img/s", "navit img/s", "navit ÷ hf",
                           "hf + processor img/s", "navit + processor img/s", "navit ÷ hf (end to end)",
                           "tokens computed (hf / navit)", "hf peak MB", "navit peak MB", "target ≥ 2×"], table))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = run_parser(__doc__, "siglip2")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--batch-images", type=int, default=16)
    p.add_argument("--max-patches", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--memory-worker", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args)
        return 0
    import transformers

    args.device = torch.device(args.device)
    args.folder = make_folder(args)
    images = make_images(args)
    res = {**new_result("siglip2.py", argv, args), "transformers": transformers.__version__}
    res["speed"] = run_speed(args, args.folder, images)
    if args.memory and args.device.type == "cpu":
        res["memory"] = {str(n): {impl: memory_point(args, impl, n) for impl in ("transformers", "navit")}
                         for n in args.max_patches}  # fmt: skip
    write_report(res, render(res), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
