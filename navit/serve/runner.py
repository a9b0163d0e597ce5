"""Running the app under uvicorn: in the foreground (``navit serve``) or in a background thread.

In the foreground, SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight
finish (the batcher drains its queue at lifespan shutdown) and returns, so the process exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

import torch

from navit.serve.batcher import BatchingConfig
from navit.serve.limits import ServeLimits

GRACEFUL_SECONDS = 60  # the longest SIGTERM waits for requests in flight


def build_service(checkpoint: str | Path, *, device: str = "cpu", arch: str | None = None,
                  batching: BatchingConfig | None = None, limits: ServeLimits | None = None):  # fmt: skip
    """A :class:`~navit.serve.app.Service` for the model at ``checkpoint`` (not started)."""
    from navit.serve.app import Service
    from navit.serve.served import ServedModel

    served = ServedModel.load(checkpoint, device, arch)
    return Service(served, batching or BatchingConfig(), limits or ServeLimits())


def _server(service, host: str, port: int, log_level: str):
    import uvicorn

    from navit.serve.app import create_app

    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_SECONDS, access_log=False)  # fmt: skip
    return uvicorn.Server(config)


def serve_forever(service, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> int:
    """Serve until SIGTERM or SIGINT, drain, and return 0."""
    # uvicorn raises the signal it caught again once it has shut down; with these handlers in
    # place that second delivery is a no-op, so a graceful stop ends the process with status 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = _server(service, host, port, log_level)
        print(f"navit serve: {service.served.name} on http://{host}:{port} ({service.batching.batching} batching)",
              flush=True)  # fmt: skip
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1


@contextlib.contextmanager
def background(service, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0) -> Iterator[str]:
    """Serve ``service`` from a thread while the block runs; yields its base URL once it is up
    and warmed up (``port=0``: a free port)."""
    server = _server(service, host, port, "warning")
    thread = threading.Thread(target=server.run, name="navit-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not (server.started and service.ready.is_set()):
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            why = service.warm_error or "no reason given"
            raise RuntimeError(f"the server did not start within {timeout} s ({why})")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def serve_from_args(args: argparse.Namespace) -> int:
    """``navit serve``: load, check the flags, serve; errors a user can make exit in one line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        batching = BatchingConfig(args.batching, args.max_batch_tokens, args.max_wait_ms, args.budget)
        limits = ServeLimits(args.max_body_mb, args.max_pixels, args.max_images, args.max_frames, args.max_queue)
        service = build_service(args.checkpoint, device=args.device, arch=args.arch, batching=batching, limits=limits)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise SystemExit(f"navit serve: {error}") from error
    return serve_forever(service, args.host, args.port, args.log_level)
