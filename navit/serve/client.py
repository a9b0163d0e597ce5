"""A small client of ``navit serve``: send files or images, get the parsed results back.

    from navit.serve.client import Client

    with Client("http://127.0.0.1:8000") as client:
        results = client.predict(["cat.jpg", "dog.png"], topk=3)  # one dict per file, in order
        vectors = client.embed(["cat.jpg"])
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any, Sequence

import httpx
from PIL import Image


class ServerError(RuntimeError):
    """The server answered with an error status (its JSON message and ``status``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def encode(item: str | os.PathLike[str] | bytes | Image.Image) -> tuple[str, bytes]:
    """(name, file bytes) of a local file path, encoded bytes or a PIL image (sent as PNG). The
    client reads its own files; the server only ever sees bytes."""
    if isinstance(item, Image.Image):
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return "image.png", buffer.getvalue()
    if isinstance(item, (bytes, bytearray)):
        return "input", bytes(item)
    return Path(item).name, Path(item).read_bytes()


class Client:
    """Talks to one server; ``timeout`` in seconds bounds every call."""

    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0) -> None:
        self.http = httpx.Client(base_url=url, timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise ServerError(response.status_code, message)
        return response.json()

    def healthy(self) -> bool:
        return self.http.get("/healthz").status_code == 200

    def model(self) -> dict[str, Any]:
        """The served model's name, task, class names and processor settings."""
        return self._json(self.http.get("/v1/models"))["data"][0]

    def predict(self, items: Sequence[Any], *, topk: int | None = None, budget: int | None = None,
                threshold: float | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """One result per item, in order (an item the server cannot decode has an ``"error"``)."""
        files = [("file", encode(item)) for item in items]
        fields = {k: str(v) for k, v in (("topk", topk), ("budget", budget), ("threshold", threshold)) if v is not None}
        return self._json(self.http.post("/v1/predict", files=files, data=fields))["results"]

    def embed(self, items: Sequence[Any], *, budget: int | None = None) -> list[list[float] | None]:
        """One embedding per image (files, bytes, PIL images) or text (a ``{"text": ...}`` dict)."""
        inputs = [item if isinstance(item, dict) else {"image": base64.b64encode(encode(item)[1]).decode("ascii")}
                  for item in items]  # fmt: skip
        body = {"input": inputs} | ({"budget": budget} if budget is not None else {})
        return [row["embedding"] for row in self._json(self.http.post("/v1/embeddings", json=body))["data"]]
