"""``navit serve`` over real HTTP: the server runs as a subprocess on a free port of 127.0.0.1.

Concurrent mixed-size requests get what ``navit predict --json`` prints; every bad input and
limit gets its status and a JSON error naming the limit; a full queue answers 503; a client that
leaves has its queued work dropped; SIGTERM finishes the requests in flight and exits 0.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import navit
from conftest import tiny_config, tiny_model
from navit.cli import main as navit_main

CLASSES = [f"class{i}" for i in range(7)]
SIZES = [(16, 16), (40, 24), (24, 64), (72, 56), (120, 96), (96, 120), (33, 17), (128, 128), (64, 16), (48, 48)]


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``navit serve`` in a subprocess (started at once; :meth:`wait_healthy` waits for it)."""

    def __init__(self, checkpoint: Path, log: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "navit", "serve", "--checkpoint", str(checkpoint), "--port", str(self.port),
                   *flags]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait_healthy(self) -> "Server":
        log, deadline = self.log, time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited: {log.read_text()}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"the server did not become healthy: {log.read_text()}")

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        found = re.search(rf"^{name} (\S+)$", text, flags=re.M)
        return float(found.group(1)) if found else 0.0

    def wait_metric(self, name: str, at_least: float, seconds: float = 10) -> float:
        deadline = time.monotonic() + seconds
        while (value := self.metric(name)) < at_least:
            assert time.monotonic() < deadline, f"{name} stayed at {value} (< {at_least})"
            time.sleep(0.02)
        return value

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    model = tiny_model(seed=3)
    navit.save_model(model, folder / "model", class_names=CLASSES)
    images = []
    for i, (w, h) in enumerate(SIZES):
        path = folder / f"img{i}.png"
        path.write_bytes(png_bytes(w, h, seed=i))
        images.append(path)
    return folder, images


@pytest.fixture(scope="module")
def servers(files):
    """Three servers, started together: ``main`` batches as usual under tight limits; ``slow``
    lets batches wait 1.5 s to fill and at most 6 images queue (room to watch the queue);
    ``term`` (for the SIGTERM test) also waits 1.5 s."""
    folder, _ = files
    model = folder / "model"
    flags = {
        "main": ("--max-wait-ms", "20", "--max-batch-tokens", "512", "--max-images", "8", "--max-body-mb", "1",
                 "--max-pixels", "1000000", "--max-frames", "8"),
        "slow": ("--max-wait-ms", "1500", "--max-batch-tokens", "100000", "--max-queue", "6"),
        "term": ("--max-wait-ms", "1500", "--max-batch-tokens", "100000"),
    }  # fmt: skip
    running = {name: Server(model, folder / f"{name}.log", *f) for name, f in flags.items()}
    try:
        yield {name: server.wait_healthy() for name, server in running.items()}
    finally:
        for server in running.values():
            server.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"]


@pytest.fixture(scope="module")
def slow_server(servers):
    return servers["slow"]


def reference(files, capsys) -> dict[str, dict]:
    """What ``navit predict --json`` prints for every test image, by file name."""
    folder, images = files
    capsys.readouterr()
    navit_main(["predict", "--checkpoint", str(folder / "model"), *map(str, images), "--json", "--topk", "7"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return {Path(row["path"]).name: row for row in rows}


def post_multipart(url: str, paths: list[Path], **fields) -> httpx.Response:
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in paths]
    return httpx.post(f"{url}/v1/predict", files=files, data={k: str(v) for k, v in fields.items()}, timeout=60)


def post_json(url: str, paths: list[Path], **fields) -> httpx.Response:
    inputs = [{"image": base64.b64encode(p.read_bytes()).decode(), "name": p.name} for p in paths]
    return httpx.post(f"{url}/v1/predict", json={"inputs": inputs, **fields}, timeout=60)


def scores(row: dict) -> dict[str, float]:
    return {x["label"]: x["score"] for x in row["labels"]}


def test_32_concurrent_mixed_requests_answer_as_navit_predict(server, files, capsys):
    expected = reference(files, capsys)
    _, images = files
    rng = np.random.default_rng(0)
    requests = [[images[j] for j in rng.choice(len(images), size=int(rng.integers(1, 4)), replace=False)]
                for _ in range(31)]  # fmt: skip
    requests.append(images[:8])  # 8 images, more tokens than one forward holds: it spans batches
    batches_before = server.metric("navit_batches_total")

    def send(i: int) -> tuple[list[Path], httpx.Response]:
        post = post_multipart if i % 2 else post_json
        return requests[i], post(server.url, requests[i], topk=7)

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(send, range(32)))
    sent = 0
    for paths, response in answers:
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["input"] for r in results] == [p.name for p in paths]
        for result in results:
            want = expected[result["input"]]
            assert result["error"] is None and result["tokens"] == want["tokens"]
            got, ref = scores(result), scores(want)
            assert set(got) == set(ref) == set(CLASSES)
            assert max(abs(got[k] - ref[k]) for k in ref) < 1e-4
            sent += 1
    forwards = server.metric("navit_batches_total") - batches_before
    assert 2 <= forwards < sent, f"{sent} images in {forwards} forwards: concurrent requests were not packed together"


def test_models_health_and_metrics_describe_the_server(server):
    model = httpx.get(f"{server.url}/v1/models", timeout=5).json()["data"][0]
    assert model["task"] == "classify" and model["class_names"] == CLASSES
    assert model["processor"]["patch_size"] == 8 and model["batching"]["max_batch_tokens"] == 512
    assert httpx.get(f"{server.url}/healthz", timeout=5).json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    for name in ("navit_requests_total", "navit_errors_total", "navit_images_total", "navit_tokens_total",
                 "navit_batch_fill_bucket", "navit_queue_depth", "navit_request_seconds_bucket"):  # fmt: skip
        assert name in text


def test_embeddings_have_the_openai_shape_and_the_models_vectors(server, files):
    folder, images = files
    body = {"input": [base64.b64encode(images[i].read_bytes()).decode() for i in (1, 4)], "model": "model"}
    answer = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=30).json()
    model = navit.load_model(folder / "model")
    with torch.no_grad():
        want = model.embed(model.processor([str(images[1]), str(images[4])]))
    assert answer["object"] == "list" and answer["model"] == "model"
    assert [row["index"] for row in answer["data"]] == [0, 1] and answer["data"][0]["object"] == "embedding"
    assert torch.allclose(torch.tensor([row["embedding"] for row in answer["data"]]), want, atol=1e-4)
    tokens = model.processor([str(images[1]), str(images[4])]).num_real_tokens
    assert answer["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    wrong = httpx.post(f"{server.url}/v1/embeddings", json={**body, "model": "other"}, timeout=30)
    assert wrong.status_code == 404 and "other" in wrong.json()["error"]["message"]


def test_an_undecodable_image_or_a_path_gets_its_own_error(server, files):
    _, images = files
    parts = [("file", ("good.png", images[0].read_bytes(), "image/png")), ("file", ("bad.png", b"not an image"))]
    results = httpx.post(f"{server.url}/v1/predict", files=parts, timeout=30).json()["results"]
    assert results[0]["error"] is None and results[0]["labels"]
    assert "bad.png" in results[1]["error"] and "labels" not in results[1]
    secret = images[0].resolve()  # a server-side path, as text and as base64 text: never read
    inputs = [{"image": str(secret)}, {"image": base64.b64encode(str(secret).encode()).decode()}, {"image": 3}]
    results = httpx.post(f"{server.url}/v1/predict", json={"inputs": inputs}, timeout=30).json()["results"]
    assert all(r["error"] and "labels" not in r for r in results)
    assert "not base64" in results[0]["error"] and "cannot decode image" in results[1]["error"]


@pytest.mark.parametrize("case,status,cause", [
    ("images", 413, "max-images"), ("body", 413, "max-body-mb"), ("pixels", 413, "max-pixels"),
    ("frames", 413, "max-frames"), ("json", 400, "bad-request"), ("field", 400, "bad-request"),
    ("topk", 400, "bad-request"), ("budget", 400, "bad-request"), ("threshold", 400, "bad-request"),
    ("content-type", 400, "bad-request"), ("empty", 400, "bad-request"),
])  # fmt: skip
def test_limits_and_malformed_requests_answer_json_errors(server, files, tmp_path, case, status, cause):
    _, images = files
    url = f"{server.url}/v1/predict"
    if case == "images":
        response = post_multipart(server.url, [images[0]] * 9)
    elif case == "body":
        body = b"x" * (2**20 + 10)
        response = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    elif case == "pixels":
        big = io.BytesIO()
        Image.new("RGB", (1200, 1000)).save(big, format="PNG")
        response = httpx.post(url, files=[("file", ("big.png", big.getvalue(), "image/png"))], timeout=30)
    elif case == "frames":
        pytest.importorskip("av")
        from navit.media.video import write_video

        write_video(tmp_path / "long.mp4", [Image.new("RGB", (32, 32), (i * 10, 0, 0)) for i in range(20)], fps=10)
        clip = (tmp_path / "long.mp4").read_bytes()
        response = httpx.post(url, files=[("file", ("long.mp4", clip, "video/mp4"))], timeout=30)
    elif case == "content-type":
        response = httpx.post(url, content=b"abc", headers={"content-type": "text/plain"}, timeout=30)
    else:
        inputs = [{"image": base64.b64encode(images[0].read_bytes()).decode()}]
        body = {"json": b"{not json", "field": {"inputs": inputs, "topk": 2, "colour": "red"},
                "topk": {"inputs": inputs, "topk": 0}, "budget": {"inputs": inputs, "budget": 10**6},
                "threshold": {"inputs": inputs, "threshold": 0.5}, "empty": {"inputs": []}}[case]  # fmt: skip
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == cause and error["status"] == status
    if status == 413:
        assert f"--{cause}" in error["message"]
    wanted = {"topk": '"topk"', "budget": '"budget"', "threshold": '"threshold"', "field": "colour"}.get(case)
    assert wanted is None or wanted in error["message"]


def test_a_full_queue_answers_503_with_retry_after(slow_server, files):
    _, images = files
    first: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: first.append(post_multipart(slow_server.url, images[:4])))
    sender.start()
    slow_server.wait_metric("navit_pending_images", 4)
    refused = post_multipart(slow_server.url, images[4:7])  # 4 + 3 > --max-queue 6
    sender.join(30)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "overloaded" and "--max-queue" in refused.json()["error"]["message"]
    assert first[0].status_code == 200 and len(first[0].json()["results"]) == 4


def test_a_client_that_leaves_has_its_queued_work_dropped(slow_server, files):
    _, images = files
    dropped = slow_server.metric("navit_dropped_images_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow_server.url}/v1/predict", files=[("file", (p.name, p.read_bytes())) for p in images[:3]],
                   timeout=httpx.Timeout(10, read=0.5))  # fmt: skip
    slow_server.wait_metric("navit_dropped_images_total", dropped + 3)
    assert slow_server.metric("navit_pending_images") == 0


def test_sigterm_finishes_requests_in_flight_and_exits_0(servers, files):
    _, images = files
    running = servers["term"]
    try:
        answers: list[httpx.Response] = []
        sender = threading.Thread(target=lambda: answers.append(post_multipart(running.url, images[:2])))
        sender.start()
        running.wait_metric("navit_pending_images", 2)
        running.process.send_signal(signal.SIGTERM)
        sender.join(30)
        assert answers and answers[0].status_code == 200
        assert [r["error"] for r in answers[0].json()["results"]] == [None, None]
        assert running.process.wait(30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{running.url}/healthz", timeout=2)
    finally:
        running.stop()


def test_health_is_503_until_warm_and_work_waits_for_it(files):
    from navit.serve.app import create_app
    from navit.serve.runner import build_service

    folder, _ = files
    service = build_service(folder / "model")  # not started: no warm-up has run

    async def ask() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://navit") as client:
            return await client.get("/healthz"), await client.post("/v1/predict", json={"inputs": []})

    health, predict = asyncio.run(ask())
    assert health.status_code == 503 and health.headers["retry-after"] == "1"
    assert predict.status_code == 503 and predict.json()["error"]["type"] == "not-ready"


def test_masks_become_png_and_text_embeddings_come_from_the_text_tower():
    from navit.serve.served import ServedModel, jsonable
    from navit.two_tower import create_image_text_model

    labels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = jsonable({"mask": labels, "score": np.float32(0.5), "boxes": torch.ones(1, 4)})
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(out["mask"])))), labels)
    assert out["score"] == 0.5 and out["boxes"] == [[1.0, 1.0, 1.0, 1.0]]
    clip = create_image_text_model(tiny_config(num_classes=0), text_depth=1).eval()
    served = ServedModel(clip, None, "clip")
    ids, mask = clip.tokenizer().encode(["a red square"])
    with torch.no_grad():
        want = clip.encode_text(ids, mask)
    assert torch.allclose(torch.tensor(served.embed_texts(["a red square"])), want, atol=1e-6)
    assert served.describe()["text_embeddings"] and served.text_tokens("a red square") == int(mask.sum())


# -- how packed forwards are laid out (no server) ----------------------------------------------------


def test_packed_rows_fit_what_waits_not_the_models_max_tokens():
    from navit.serve.layout import packed_rows

    assert packed_rows([108], 2048, 256) == ([0], 108)  # one image: one row of its own length
    assert packed_rows([100] * 8, 2048, 256) == (list(range(8)), 100)  # equal images: no padding at all
    taken, seq_len = packed_rows([200, 40, 60, 100, 30], 2048, 256)
    assert taken == [0, 1, 2, 3, 4] and seq_len == 240  # 2 rows of 240 (430 tokens) beat 2 of 256


def test_packed_rows_stay_within_the_token_budget_and_take_the_oldest():
    from navit.batch import PAD
    from navit.packing import assign_first_fit
    from navit.serve.layout import packed_rows

    lengths = [int(n) for n in np.random.default_rng(0).integers(12, 226, 60)]
    taken, seq_len = packed_rows(lengths, 2048, 256)
    assert taken[0] == 0 and taken == sorted(taken)
    rows = assign_first_fit([lengths[i] for i in taken], seq_len)  # how the forward packs them
    assert PAD not in rows and (max(rows) + 1) * seq_len <= 2048
    assert sum(lengths[i] for i in taken) >= 0.9 * 2048  # the budget is nearly all real tokens
    assert packed_rows([300, 10], 2048, 256) == ([0, 1], 300)  # an image over max_tokens (a budget) still fits


def test_threads_flag_sets_the_forward_threads_before_the_model_loads(monkeypatch, tmp_path):
    import navit.serve.runner as runner

    calls = []

    def load(*args, **kwargs):
        calls.append("load")
        raise FileNotFoundError("x")

    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    monkeypatch.setattr(runner, "build_service", load)
    with pytest.raises(SystemExit, match="navit serve: x"):
        navit_main(["serve", "--checkpoint", str(tmp_path), "--threads", "3"])
    assert calls == [("threads", 3), "load"]
