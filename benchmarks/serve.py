"""``navit serve`` under load: throughput and latency of packed, padded and single batching.

A random NaViT classifier (width 256, depth 6, patch 16, ``--max-tokens`` per image) is saved once
per attention backend and served by one ``navit serve`` subprocess per (backend, batching mode) on
127.0.0.1, all started at once. Closed-loop clients (each sends one image, waits for the answer,
sends the next) run for ``--seconds`` at each concurrency, on two image mixes, the modes
interleaved in a rotating order and every cell repeated ``--repeats`` times (medians reported), so
load from other jobs on the machine falls on every mode alike:

* ``paper``: side ~ U(64, 256) pixels with the aspect ratio drawn from {1:1, 4:3, 3:4, 16:9, 9:16}
  (the paper's mix), so images have very different token counts;
* ``uniform``: every image 160 x 160, the same token count, where packing has nothing to gain.

Two attention backends (``--attn-backends``), because what padding costs depends on them:

* ``auto``: on CPU the bucketed backend, whose blocks skip padding in any layout (slot order), so
  a padded row costs about what its image does and packing gains only fuller forwards;
* ``dense``: every layer runs on every position, padding included, as a server that pads does and
  as navit's GPU kernels do in the linear layers (varlen and flex skip only padded attention).

Reported per (backend, mix, mode, concurrency): images/s and p50 / p99 latency in ms, and from the
server's /metrics what it did meanwhile: images per forward, fill, forward ms and queue wait per
image. Clients run in this process with asyncio and httpx, so on a small machine they share the
cores with the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS_DIR, md_table  # noqa: E402

ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16)


def images(mix: str, count: int, seed: int = 0) -> list[bytes]:
    """``count`` PNG files of the mix, as bytes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        if mix == "paper":
            side, aspect = rng.uniform(64, 256), ASPECTS[rng.integers(len(ASPECTS))]
            width, height = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
        else:
            width = height = 160
        pixels = rng.integers(0, 256, (max(8, int(height)), max(8, int(width)), 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def save_model(folder: Path, args: argparse.Namespace, attn_backend: str) -> Path:
    import torch

    import navit

    torch.manual_seed(0)  # the same weights for every backend
    config = navit.NaViTConfig(patch_size=16, embed_dim=args.width, depth=args.depth, num_heads=args.width // 64,
                               num_classes=10, attn_backend=attn_backend)  # fmt: skip
    model = navit.NaViT(config, navit.Processor(patch_size=16, max_tokens=args.max_tokens)).eval()
    return navit.save_model(model, folder / f"model-{attn_backend}")


def start(model: Path, mode: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "navit", "serve", "--checkpoint", str(model), "--port", str(port),
               "--batching", mode, "--max-batch-tokens", str(args.max_batch_tokens), "--max-wait-ms",
               str(args.max_wait_ms), "--threads", str(args.server_threads)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"serve benchmark: the {mode} server did not start")


SERVER_COUNTERS = ("navit_batches_total", "navit_images_total", "navit_tokens_total", "navit_batch_fill_sum",
                   "navit_forward_seconds_sum", "navit_queue_wait_seconds_sum")  # fmt: skip


def server_counters(url: str) -> dict[str, float]:
    """The server's own totals (forwards, images, fill, forward and queue-wait seconds)."""
    import httpx

    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    values = dict(line.rsplit(" ", 1) for line in lines if line.split(" ", 1)[0] in SERVER_COUNTERS)
    return {name: float(values.get(name, 0.0)) for name in SERVER_COUNTERS}


def server_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the server did during one run: images per forward, fill, and per image the time in
    forwards and waiting in the queue."""
    d = {name: after[name] - before[name] for name in SERVER_COUNTERS}
    batches, images = max(d["navit_batches_total"], 1), max(d["navit_images_total"], 1)
    return {"images_per_forward": d["navit_images_total"] / batches, "fill": d["navit_batch_fill_sum"] / batches,
            "forward_ms": 1000 * d["navit_forward_seconds_sum"] / batches,
            "queue_wait_ms": 1000 * d["navit_queue_wait_seconds_sum"] / images}  # fmt: skip


async def closed_loop(url: str, pictures: list[bytes], concurrency: int, seconds: float) -> dict[str, float]:
    """``concurrency`` clients, each sending one image at a time for ``seconds``."""
    import httpx

    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        i = worker
        while time.perf_counter() < stop:
            begin = time.perf_counter()
            response = await http.post("/v1/predict", files=[("file", ("x.png", pictures[i % len(pictures)]))])
            response.raise_for_status()
            latencies.append(time.perf_counter() - begin)
            i += concurrency

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {"images_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "requests": len(latencies)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each (mix, mode, concurrency) run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per (mix, mode, concurrency); medians reported")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--modes", nargs="+", default=["packed", "padded", "single"])
    parser.add_argument("--mixes", nargs="+", default=["paper", "uniform"])
    parser.add_argument("--max-tokens", type=int, default=256, help="the model's tokens per image")
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--server-threads", type=int, default=1,
                        help="torch threads per server: one leaves a core to the clients and decoding on 2 cores")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--attn-backends", nargs="+", default=["auto", "dense"],
                        help="the served model's attention backends (a set of servers each)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "serve.json")
    args = parser.parse_args()
    pictures = {mix: images(mix, 64) for mix in args.mixes}
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        servers = {}
        for attn in args.attn_backends:  # all up at once, used in turn
            model = save_model(Path(folder), args, attn)
            servers.update({(attn, mode): start(model, mode, args) for mode in args.modes})
        try:
            for url in (url for _, url in servers.values()):
                for mix in args.mixes:
                    asyncio.run(closed_loop(url, pictures[mix], 2, 0.5))  # warm the connections and caches
            for repeat in range(args.repeats):
                for attn in args.attn_backends:
                    for mix in args.mixes:
                        for concurrency in args.concurrency:
                            shift = (len(runs) // len(args.modes) + repeat) % len(args.modes)  # a rotating order
                            for mode in args.modes[shift:] + args.modes[:shift]:
                                url = servers[attn, mode][1]
                                before = server_counters(url)
                                result = asyncio.run(closed_loop(url, pictures[mix], concurrency, args.seconds))
                                split = server_split(before, server_counters(url))
                                runs.append({"attn": attn, "mix": mix, "mode": mode, "concurrency": concurrency,
                                             **result, **split})  # fmt: skip
                                print(json.dumps(runs[-1]), flush=True)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(60)
    report(medians(runs), runs, args)


def medians(runs: list[dict]) -> list[dict]:
    """One row per (backend, mix, mode, concurrency): the median of each figure over the repeats."""
    fields = ("attn", "mix", "mode", "concurrency")
    keys = sorted({tuple(r[f] for f in fields) for r in runs}, key=str)
    rows = []
    for key in keys:
        same = [r for r in runs if tuple(r[f] for f in fields) == key]
        figures = {k: float(np.median([r[k] for r in same])) for k in same[0] if isinstance(same[0][k], float)}
        rows.append({**dict(zip(fields, key)), **figures, "repeats": len(same)})
    return rows


def report(rows: list[dict], runs: list[dict], args: argparse.Namespace) -> None:
    print(f"model: NaViT width {args.width}, depth {args.depth}, {args.width // 64} heads, patch 16, at most "
          f"{args.max_tokens} tokens per image; --max-batch-tokens {args.max_batch_tokens} --max-wait-ms "
          f"{args.max_wait_ms} --threads {args.server_threads}; medians of {args.repeats} interleaved runs")  # fmt: skip
    order = lambda r: (args.attn_backends.index(r["attn"]), r["mix"], r["concurrency"], args.modes.index(r["mode"]))  # noqa: E731
    table = [[r["attn"], r["mix"], r["concurrency"], r["mode"], f"{r['images_per_s']:.1f}", f"{r['p50_ms']:.0f}",
              f"{r['p99_ms']:.0f}", f"{r['images_per_forward']:.1f}", f"{r['fill']:.2f}", f"{r['forward_ms']:.0f}",
              f"{r['queue_wait_ms']:.0f}"] for r in sorted(rows, key=order)]  # fmt: skip
    print(md_table(["attention", "mix", "clients", "batching", "images/s", "p50 ms", "p99 ms", "images/forward",
                    "fill", "forward ms", "queue wait ms"], table, "llrlrrrrrrr"))  # fmt: skip
    by = {(r["attn"], r["mix"], r["mode"], r["concurrency"]): r for r in rows}
    ratios = []
    for attn in args.attn_backends:
        for mix in args.mixes:
            for concurrency in args.concurrency:
                packed, padded = by.get((attn, mix, "packed", concurrency)), by.get((attn, mix, "padded", concurrency))
                if packed and padded:
                    ratios.append({"attn": attn, "mix": mix, "concurrency": concurrency,
                                   "packed_over_padded": packed["images_per_s"] / padded["images_per_s"],
                                   "p99_ms": [packed["p99_ms"], padded["p99_ms"]]})  # fmt: skip
                    print(f"{attn}, {mix}, {concurrency} clients: packed / padded throughput "
                          f"{ratios[-1]['packed_over_padded']:.2f}x, p99 {packed['p99_ms']:.0f} vs {padded['p99_ms']:.0f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": sys.argv, "settings": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows, "ratios": ratios, "runs": runs}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
