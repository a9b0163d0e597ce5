"""``navit serve``: an HTTP inference server that packs concurrent requests into token-budget batches.

Every request's images go into one queue; a batcher thread packs whatever is waiting first fit
into sequences (each image at its own resolution and aspect ratio) until ``--max-batch-tokens``
is reached or the oldest image has waited ``--max-wait-ms``, runs one forward off the event loop,
and routes each result back to its request (see ``docs/serve.md``).

The modules: :mod:`~navit.serve.limits` (what a request may hold, and decoding its inputs),
:mod:`~navit.serve.served` (the loaded model: examples in, JSON-able outputs out),
:mod:`~navit.serve.batcher` (the queue and the packer thread), :mod:`~navit.serve.metrics`
(Prometheus), :mod:`~navit.serve.app` (the Starlette app), :mod:`~navit.serve.runner` (uvicorn,
in the foreground or a background thread) and :mod:`~navit.serve.client` (a small httpx helper).
"""

from __future__ import annotations

import importlib.util

EXTRAS = ("uvicorn", "starlette", "multipart", "prometheus_client", "httpx")


def require_extras(what: str = "navit serve") -> None:
    """Raise ImportError in one line naming the install command when a serving package is missing."""
    missing = [name for name in EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        names = ", ".join("python-multipart" if m == "multipart" else m.replace("_", "-") for m in missing)
        raise ImportError(f"{what} needs {names}: pip install 'torch-navit[serve]'")
