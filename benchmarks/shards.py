"""Streaming WebDataset shards: loader rates from disk and HTTP, the training step they feed, the
``webdataset`` package's own pipeline, and memory over a long stream.

    python benchmarks/shards.py                       # ~6 min on 2 shared cores
    python benchmarks/shards.py --images 500 --stream 5000 --rounds 1   # a quick look

The built-in set's images (PNG, sides 32 to ``--max-side`` px, any aspect ratio) are written as a
class folder and, with ``navit data shard``'s writer, as shards of ``--max-count`` samples. Each
round reads one epoch, interleaved, with ``--workers`` loader workers and the quick-start recipe's
processing (decode, resize to at most 64 patches of 16 px, pack into 4 sequences of 256 tokens):

* ``folder``: the class folder (random access, one file per image);
* ``shards (disk)``: the shards read as streams from the local disk;
* ``shards (http)``: the same shards from an HTTP server on 127.0.0.1 (a thread of this process);
* ``webdataset``: the ``webdataset`` package's pipeline over the same shard files (its tar
  reader, split by worker, in a ``DataLoader``), each sample decoded and resized by the same
  function, with no packing: what a navit-less pipeline does for the same work.

The training step of the quick-start model (``navit_mini16``, AdamW) on the loader's batches gives
the rate the loader must keep up with (goal: batches/s at least twice steps/s). The main process
reads with the torch threads a training run leaves it (cores less workers), the step runs with
``--threads``. Last, a stream of
``--stream`` samples from the disk shards (passes over them) with the resident memory of the main
process and its workers at the start and the end. Prints Markdown, writes ``results/shards.json``.
"""

from __future__ import annotations

import functools
import http.server
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import navit  # noqa: E402
from bench_common import packed_loader, parse_run, rss_kb, run_parser  # noqa: E402
from navit.config import resolve_config  # noqa: E402
from navit.data.folder import ImageFolder  # noqa: E402
from navit.data.shard_writer import write_shards  # noqa: E402
from navit.data.webdataset import Shards  # noqa: E402
from navit.media.image import load_rgb  # noqa: E402
from navit.synthetic.shapes import SyntheticShapes, write_image_folder  # noqa: E402
from report import fmt, heading, md_table, write_report  # noqa: E402

READERS = ("folder", "shards (disk)", "shards (http)", "webdataset")
PACKING = {"seq_len": 256, "num_seqs": 4, "max_examples_per_seq": 64, "buffer_size": 128}


def prepare(args, root: Path) -> dict[str, object]:
    """The class folder, its shards, and an HTTP server for them: {reader: source or URLs}."""
    write_image_folder(SyntheticShapes(args.images, seed=0, max_side=args.max_side), root / "folder", progress=False)
    folder = ImageFolder(root / "folder")
    write_shards(folder, root / "shards", max_count=args.max_count, progress=False)
    handler = functools.partial(_Quiet, directory=str(root / "shards"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    return {"folder": folder, "shards (disk)": Shards(str(root / "shards")), "shards (http)": Shards(f"{base}/index.json"),
            "webdataset": sorted(str(p) for p in (root / "shards").glob("*.tar")), "server": server}  # fmt: skip


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _example(processor: navit.Processor, sample: dict) -> navit.Example:
    """The webdataset pipeline's work per sample: navit's decoding and resizing of its image."""
    data = next(v for k, v in sample.items() if k in ("png", "jpg", "jpeg", "webp"))
    return processor.to_example(load_rgb(data, name=sample["__key__"]))


def webdataset_epoch(urls: list[str], processor: navit.Processor, workers: int) -> tuple[float, int, int]:
    """(seconds, samples, 0) of one epoch of the webdataset package's pipeline."""
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(functools.partial(_example, processor))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4)
    start, count = time.perf_counter(), 0
    for _ in loader:
        count += 1
    return time.perf_counter() - start, count, 0


def navit_epoch(source, processor: navit.Processor, workers: int, keep: list | None = None) -> tuple[float, int, int]:
    """(seconds, samples, batches) of one epoch of navit's loader over ``source``."""
    loader = packed_loader(source, processor, num_workers=workers, train=False, **PACKING)
    start, samples, batches = time.perf_counter(), 0, 0
    for item in loader:
        samples, batches = samples + item.batch.num_examples, batches + 1
        if keep is not None and len(keep) < 8:
            keep.append(item)
    return time.perf_counter() - start, samples, batches


def step_rate(batches: list, repeats: int) -> float:
    """Training steps per second of the quick-start model on ``batches`` (a warm-up step first)."""
    model = navit.NaViT(resolve_config("navit_mini16", num_classes=6))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step(item) -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(item.batch), item.targets["label"]).backward()
        optimizer.step()

    step(batches[0])
    start = time.perf_counter()
    for k in range(repeats):
        step(batches[k % len(batches)])
    return repeats / (time.perf_counter() - start)


def children_rss_kb() -> int:
    """Resident memory of this process's children (the loader workers), from /proc."""
    total = 0
    try:
        children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    except OSError:
        return 0
    for pid in children:
        try:
            line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS"))
            total += int(line.split()[1])
        except (OSError, StopIteration):
            pass
    return total


def memory_over_stream(source, processor: navit.Processor, workers: int, samples: int) -> dict[str, float]:
    """Resident memory (MiB) of the main process and of the workers (summed) early in a
    ``samples``-long stream of passes and at its end (workers are new each pass: their last
    reading is taken while the last pass's workers run)."""
    loader = packed_loader(source, processor, num_workers=workers, train=True, **PACKING)
    seen, main, held, start = 0, [], [], time.perf_counter()
    while seen < samples:
        for batches, item in enumerate(loader):
            seen += item.batch.num_examples
            if batches % 10 == 0:
                main.append(rss_kb() / 1024)
                held += [children_rss_kb() / 1024] if workers else []
            if seen >= samples:
                break
    held = [mib for mib in held if mib] or [0.0]
    return {"start_main": round(main[0], 1), "end_main": round(rss_kb() / 1024, 1), "peak_main": round(max(main), 1),
            "start_workers": round(held[0], 1), "end_workers": round(held[-1], 1), "samples": seen,
            "passes": loader.epoch, "samples_per_s": round(seen / (time.perf_counter() - start), 1)}  # fmt: skip


def run(args) -> dict:
    processor = navit.Processor(patch_size=16, max_tokens=64)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - args.workers))  # the main process's threads in training
    with tempfile.TemporaryDirectory() as folder:
        readers = prepare(args, Path(folder))
        times: dict[str, list[tuple[float, int, int]]] = {name: [] for name in READERS}
        kept: list = []
        for _ in range(args.rounds):
            for name in READERS:
                if name == "webdataset":
                    times[name].append(webdataset_epoch(readers[name], processor, args.workers))
                else:
                    times[name].append(navit_epoch(readers[name], processor, args.workers, kept))
        torch.set_num_threads(args.threads)
        steps_per_s = step_rate(kept, args.steps)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - args.workers))
        memory = memory_over_stream(readers["shards (disk)"], processor, args.workers, args.stream)
        readers["server"].shutdown()
    rows = {}
    for name, runs in times.items():
        rate = statistics.median(samples / seconds for seconds, samples, _ in runs)
        batch_rate = statistics.median(batches / seconds for seconds, _, batches in runs) if runs[0][2] else None
        rows[name] = {"samples_per_s": round(rate, 1), "batches_per_s": batch_rate and round(batch_rate, 2),
                      "samples": runs[0][1]}  # fmt: skip
    return {"readers": rows, "train_steps_per_s": round(steps_per_s, 2), "memory_mib": memory,
            "shards": -(-args.images // args.max_count)}  # fmt: skip


def markdown(res: dict) -> str:
    r, steps = res["readers"], res["train_steps_per_s"]
    web = r["webdataset"]["samples_per_s"]
    rows = [[name, fmt(v["samples_per_s"]), fmt(v["batches_per_s"], 2) if v["batches_per_s"] else "—",
             f"{v['batches_per_s'] / steps:.2f}×" if v["batches_per_s"] else "—",
             f"{v['samples_per_s'] / web:.2f}×"] for name, v in r.items()]  # fmt: skip
    m = res["memory_mib"]
    lines = heading("Streaming shards", res) + [
        md_table(["reader", "samples/s", "batches/s", "batches/s ÷ train steps/s", "samples/s vs webdataset"], rows),
        "",
        f"Training steps/s of the quick-start model on these batches: {steps:.2f}. "
        f"{res['args']['images']} images in {res['shards']} shards, {res['args']['workers']} workers, "
        f"median of {res['args']['rounds']} interleaved epochs.",
        "",
        f"Memory over a stream of {m['samples']:,} samples ({m['passes']} passes, {fmt(m['samples_per_s'])} samples/s): "
        f"main process {m['start_main']} → {m['end_main']} MiB (peak {m['peak_main']}), "
        f"workers {m['start_workers']} → {m['end_workers']} MiB.",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = run_parser(__doc__, "shards")
    parser.add_argument("--images", type=int, default=2000, help="images in the set (default: 2000)")
    parser.add_argument("--max-side", type=int, default=256, help="largest image side in px (default: 256)")
    parser.add_argument("--max-count", type=int, default=250, help="samples per shard (default: 250)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved epochs per reader (default: 3)")
    parser.add_argument("--steps", type=int, default=10, help="training steps timed (default: 10)")
    parser.add_argument("--stream", type=int, default=100_000, help="samples in the memory stream (default: 100000)")
    args, res = parse_run(parser, argv, "shards.py")
    res.update(run(args))
    write_report(res, markdown(res), args.out)
    return res


if __name__ == "__main__":
    main()
