"""WebDataset shards read as streams: local files, HTTP on 127.0.0.1 and S3 (moto), the
distribution over ranks and lanes, exact resume, holdout, and faults counted by cause."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import TINY_TRAIN, run_ranks
from PIL import Image

from navit.checkpoint import load_meta
from navit.data.loader import PackedLoader
from navit.data.registry import open_source
from navit.data.stream import first_items, num_items, split_holdout
from navit.data.urls import ByteStream, Unavailable, expand
from navit.data.webdataset import Shards, split_name
from navit.ops import eval_chain
from navit.packing import PackingConfig
from navit.processor import Processor

COUNTS = [3, 7, 1, 5, 4]  # uneven shards
CLASSES = ["circle", "square", "star"]


def png(index: int, width: int = 24, height: int = 16) -> bytes:
    """A PNG whose pixels encode ``index`` (so a decoded image says which sample it was)."""
    pixels = np.full((height, width, 3), (index * 7 % 256, index // 37, 200), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    """A WebDataset shard: each sample's fields as consecutive members ``<key>.<field>``."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for field, data in sample.items():
                if field == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{field}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_shards(folder: Path, counts=COUNTS, index: bool = True) -> list[str]:
    """Shards of ``counts`` samples (image, class index, caption); with an ``index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    number, entries = 0, []
    for s, count in enumerate(counts):
        samples = []
        for _ in range(count):
            samples.append({"__key__": f"{number:06d}", "png": png(number, 16 + 8 * (number % 3)),
                            "cls": str(number % 3).encode(), "txt": f"sample {number}".encode()})  # fmt: skip
            number += 1
        write_tar(folder / f"shard-{s:03d}.tar", samples)
        entries.append({"url": f"shard-{s:03d}.tar", "count": count})
    if index:
        (folder / "index.json").write_text(json.dumps({"format": "navit-shards", "version": 1, "count": number,
                                                       "classes": CLASSES, "provides": ["caption", "image", "label"],
                                                       "shards": entries}))  # fmt: skip
    return [str(folder / e["url"]) for e in entries]


def losses(run: Path) -> dict[int, float]:
    """Loss per step (a step logged before a kill and again after the resume: the last)."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def all_keys(counts=COUNTS) -> set[str]:
    return {f"{i:06d}" for i in range(sum(counts))}


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve():
    """``serve(folder, handler=None)`` -> base URL of an HTTP server on 127.0.0.1 for ``folder``."""
    servers = []

    def start(folder: Path, handler=_Quiet) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def loader(source, workers: int = 0, rank: int = 0, world: int = 1, train: bool = True, **kw) -> PackedLoader:
    chain = eval_chain(Processor(patch_size=8, max_tokens=16))
    return PackedLoader(source, chain, num_workers=workers, rank=rank, world_size=world, train=train, seed=3,
                        chunk_size=2, packing=PackingConfig(seq_len=16, num_seqs=2, buffer_size=8), **kw)  # fmt: skip


def epoch_keys(source, **kw) -> list[str]:
    return [key for batch in loader(source, **kw) for key in batch.keys]


# ------------------------------------------------------------------------------------------------
# Format


def test_member_names_split_at_the_first_dot_of_the_file_name():
    assert split_name("a/b/0001.mask.png") == ("a/b/0001", "mask.png")
    assert split_name("./x.JPG") == ("x", "jpg")
    assert split_name("dir.v2/k.cls") == ("dir.v2/k", "cls")
    assert split_name("noext") is None and split_name("d/.hidden.png") is None


def test_shards_written_by_the_webdataset_package_read_as_items(tmp_path):
    wds = pytest.importorskip("webdataset")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    with wds.TarWriter(str(tmp_path / "w-000.tar")) as writer:
        writer.write({"__key__": "k0", "png": png(5), "cls": b"2", "txt": "a red star"})
        writer.write({"__key__": "k1", "jpg": Image.new("RGB", (40, 8), (9, 9, 9)), "cls": b"square"})
        writer.write({"__key__": "k2", "png": png(6), "json": {"label": "circle", "boxes": [[1, 2, 5, 9]]}})
    source = open_source(str(tmp_path / "w-000.tar"))
    assert isinstance(source, Shards) and source.class_names == CLASSES
    assert source.provides == {"image", "label", "caption"}  # from the first sample
    records = {r.key: r for r in source.read(source.parts(0, 0, 1, shuffle=False, seed=0, size=1)[0])}
    assert [r.error for r in records.values()] == [None] * 3
    k0, k1, k2 = (records[k].item for k in ("k0", "k1", "k2"))
    assert k0["label"] == 2 and k0["caption"] == "a red star"
    assert np.asarray(k0["image"])[0, 0].tolist() == [35, 0, 200]  # png(5): pixels as stored
    assert k1["label"] == 1 and k1["image"].size == (40, 8)
    assert k2["label"] == 0 and k2["boxes"].tolist() == [[1, 2, 5, 9]] and k2["box_labels"].tolist() == [0]


def test_an_index_gives_length_classes_and_ranks_of_even_sample_counts(tmp_path):
    make_shards(tmp_path / "s")
    source = open_source(str(tmp_path / "s"))
    assert isinstance(source, Shards) and len(source) == 20 and source.class_names == CLASSES
    for epoch in range(4):
        loads = [sum(source.counts[p.spec[0]] for p in source.parts(epoch, r, 2, shuffle=True, seed=0, size=1))
                 for r in range(2)]  # fmt: skip
        assert loads == [10, 10]  # 7+3 and 5+4+1
    bare = Shards(expand(str(tmp_path / "s" / "shard-{000..004}.tar")))
    with pytest.raises(TypeError, match="length is unknown"):
        len(bare)
    assert num_items(bare) is None and num_items(split_holdout(source, 0.25, 0)[0]) == 15


def test_labels_must_be_known_classes(tmp_path):
    write_tar(tmp_path / "a.tar", [{"__key__": "x", "png": png(1), "cls": b"dog"},
                                   {"__key__": "y", "png": png(2), "cls": b"7"}])  # fmt: skip
    source = Shards(str(tmp_path / "a.tar"), classes=CLASSES)
    errors = [str(r.error) for r in source.read(source.parts(0, 0, 1, shuffle=False, seed=0, size=1)[0])]
    assert "a.tar:x.cls: 'dog' is not a class index or a known class name" in errors[0]
    assert "a.tar:y: label 7 is outside the 3 classes" in errors[1]


# ------------------------------------------------------------------------------------------------
# Distribution and resume


def test_every_sample_once_per_epoch_over_ranks_and_lanes_reshuffled_each_epoch(tmp_path):
    source = Shards(make_shards(tmp_path))  # no index: shards dealt in turn
    epochs = []
    for epoch in range(2):
        seen = []
        for rank in range(2):
            for part in source.parts(epoch, rank, 2, shuffle=True, seed=1, size=1):
                seen += [r.key for r in source.read(part)]
        assert sorted(seen) == sorted(all_keys())
        epochs.append(seen)
    assert epochs[0] != epochs[1]
    keys = epoch_keys(source, workers=2, rank=1, world=2)  # two lanes of one rank share its shards
    mine = [r.key for p in source.parts(0, 1, 2, shuffle=True, seed=3, size=1) for r in source.read(p)]
    assert sorted(keys) == sorted(mine)


def test_too_few_shards_for_the_ranks_is_an_error_naming_the_fix(tmp_path):
    source = Shards(make_shards(tmp_path, counts=[2, 2]))
    with pytest.raises(ValueError, match=r"2 shard\(s\) cannot be split over 3 ranks.*--max-count"):
        source.parts(0, 0, 3, shuffle=True, seed=0, size=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_loader_goes_on_exactly_mid_shard(tmp_path, workers):
    make_shards(tmp_path / "s")
    source = open_source(str(tmp_path / "s"))
    reference = loader(source, workers=workers)
    batches = [b for _ in range(2) for b in reference]  # two epochs
    cut = 3
    first = loader(source, workers=workers)
    stream = iter(first)
    for _ in range(cut):
        next(stream)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = loader(source, workers=workers)
    resumed.load_state_dict(state)
    rest = [b for _ in range(2) for b in resumed][: len(batches) - cut]
    assert [b.keys for b in rest] == [b.keys for b in batches[cut:]]
    for a, b in zip(rest, batches[cut:]):
        assert torch.equal(a.batch.patches, b.batch.patches) and torch.equal(a.targets["label"], b.targets["label"])


def test_a_stream_holdout_is_disjoint_and_decodes_only_its_side(tmp_path, monkeypatch):
    make_shards(tmp_path / "s")
    train, val = split_holdout(open_source(str(tmp_path / "s")), 0.3, seed=0)
    decoded = []
    monkeypatch.setattr(Shards, "decode", lambda self, sample: decoded.append(sample.key) or {"label": 0})
    got = {}
    for name, side in (("train", train), ("val", val)):
        got[name] = [r.key for p in side.parts(0, 0, 1, shuffle=False, seed=0, size=1) for r in side.read(p)]
    assert set(got["train"]).isdisjoint(got["val"]) and set(got["train"]) | set(got["val"]) == all_keys()
    assert 0 < len(got["val"]) < 20 and sorted(decoded) == sorted(got["train"] + got["val"])


def _rank_keys(rank: int, world: int, init: str, folder: str, out: str) -> None:
    torch.multiprocessing.set_start_method("fork", force=True)  # loader workers forked, as under torchrun
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    from navit.train_data import endless

    source = Shards(folder)
    run = loader(source, workers=2, rank=rank, world=world)
    seen: dict[int, list[str]] = {}
    steps = 0
    for batch in endless(run):
        seen.setdefault(run.epoch, []).extend(batch.keys)
        steps += 1
        finished = torch.tensor([run.epoch])
        dist.all_reduce(finished, op=dist.ReduceOp.MIN)  # a collective per step: ranks in lockstep
        if finished.item() >= 2:
            break
    Path(out, f"{rank}.json").write_text(json.dumps({"steps": steps, "seen": seen}))
    dist.destroy_process_group()


def test_two_ranks_of_two_lanes_see_every_sample_once_per_epoch_in_lockstep(tmp_path):
    make_shards(tmp_path / "s")
    run_ranks(_rank_keys, 2, (2, str(tmp_path / "init"), str(tmp_path / "s" / "index.json"), str(tmp_path)))
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"]
    for epoch in ("0", "1"):
        keys = ranks[0]["seen"][epoch] + ranks[1]["seen"][epoch]
        assert sorted(keys) == sorted(all_keys()), f"epoch {epoch}"
        assert set(ranks[0]["seen"][epoch]).isdisjoint(ranks[1]["seen"][epoch])


# ------------------------------------------------------------------------------------------------
# Remote shards


def test_shards_over_http_read_like_local_ones(tmp_path, serve):
    make_shards(tmp_path / "s")
    base = serve(tmp_path / "s")
    local, remote = open_source(str(tmp_path / "s")), open_source(f"{base}/index.json")
    assert len(remote) == 20 and remote.class_names == CLASSES and remote.urls[0] == f"{base}/shard-000.tar"
    assert epoch_keys(remote) == epoch_keys(local)
    braced = open_source(f"{base}/shard-{{000..004}}.tar")
    assert [p.name for p in braced.parts(0, 0, 1, shuffle=False, seed=0, size=1)][-1] == f"shard {base}/shard-004.tar"


class _Dropping(_Quiet):
    """Serves each file's first 3000 bytes, then drops the connection: once per path."""

    dropped: set = set()

    def copyfile(self, source, outputfile) -> None:
        if self.path in self.dropped:
            return super().copyfile(source, outputfile)
        self.dropped.add(self.path)
        outputfile.write(source.read(3000))
        outputfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)


def test_a_dropped_connection_is_reopened_where_it_broke(tmp_path, serve):
    make_shards(tmp_path / "s", index=False)
    base = serve(tmp_path / "s", _Dropping)
    data = (tmp_path / "s" / "shard-001.tar").read_bytes()
    with io.BufferedReader(ByteStream(f"{base}/shard-001.tar", retries=2, backoff=0.01)) as stream:
        assert stream.read() == data  # the server ignores ranges: read up to the break again
    source = Shards(f"{base}/shard-{{000..004}}.tar", backoff=0.01)
    assert sorted(epoch_keys(source)) == sorted(all_keys())


def test_unreachable_shards_are_retried_then_reported(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(Unavailable, match=r"after 2 retries"):
        ByteStream(f"http://127.0.0.1:{port}/x.tar", retries=2, backoff=0.1).read(10)
    assert time.monotonic() - start >= 0.3  # waited 0.1 then 0.2 s


def test_faults_are_counted_by_cause_and_the_epoch_finishes(tmp_path, serve):
    paths = make_shards(tmp_path / "s", index=False)
    whole = Path(paths[1]).read_bytes()
    Path(paths[1]).write_bytes(whole[: len(whole) // 2])  # truncated: its first samples stay good
    write_tar(tmp_path / "s" / "shard-005.tar", [])  # empty
    write_tar(tmp_path / "s" / "shard-006.tar", [{"__key__": "nolabel", "png": png(1)},
                                                 {"__key__": "nopicture", "cls": b"1"}])  # fmt: skip
    base = serve(tmp_path / "s")
    urls = [f"{base}/shard-{i:03d}.tar" for i in range(7)] + [f"{base}/missing.tar"]
    run = loader(Shards(urls, classes=CLASSES, backoff=0.01))
    with pytest.warns(UserWarning, match="shard-001.tar"):
        keys = [k for batch in run for k in batch.keys]
    skipped = dict(run.skipped)
    assert skipped.pop("cannot read shard <file>: HTTP 404 File not found") == 1
    assert skipped.pop("shard <file> holds no sample") == 1
    assert [k for k in skipped if k.startswith("shard damaged at <file> (")] != []
    assert skipped.pop("the item has no 'label' (it has image)") == 1
    assert any("has no image or clip" in k for k in skipped)
    assert set(range(0, 3)) | set(range(10, 20)) <= {int(k) for k in keys if k.isdigit()}
    assert 3 <= len([k for k in keys if 3 <= int(k) < 10]) < 7  # the truncated shard gave its good samples
    with pytest.raises(ValueError, match="fail_fast is on"):
        list(loader(Shards(urls[-1:] + urls[:1], classes=CLASSES, backoff=0.01), fail_fast=True))


def test_shards_on_s3_read_through_fsspec(tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
        for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():  # fmt: skip
            monkeypatch.setenv(name, value)
        paths = make_shards(tmp_path / "s")
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="data")
        for path in [*paths, str(tmp_path / "s" / "index.json")]:
            s3.upload_file(path, "data", f"set/{os.path.basename(path)}")
        source = open_source("s3://data/set/index.json")
        assert len(source) == 20 and source.urls[4] == "s3://data/set/shard-004.tar"
        assert epoch_keys(source) == epoch_keys(open_source(str(tmp_path / "s")))
    finally:
        server.stop()


def test_a_missing_storage_package_is_named(monkeypatch):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "fsspec" else real(name, *a, **k))  # fmt: skip
    with pytest.raises(ImportError, match=r"reading s3://b/\S+ needs fsspec and s3fs: pip install 'torch-navit\[cloud\]'"):
        Shards("s3://b/x.tar")


def test_first_items_of_a_stream_sample_without_a_length(tmp_path):
    source = Shards(make_shards(tmp_path, index=False))
    records = list(first_items(source, 4))
    assert len(records) == 4 and all(r.item is not None for r in records)


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux), found before any is killed."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [d for child in children for d in (child, *descendants(child))]


class _Slow(_Quiet):
    """Takes 0.3 s to start sending a shard: each epoch's start waits, so a run is killed mid-way."""

    def send_head(self):
        if self.path.endswith(".tar"):
            time.sleep(0.3)
        return super().send_head()


def test_torchrun_two_ranks_of_two_workers_resume_a_killed_run_with_the_same_losses(tmp_path, serve):
    make_shards(tmp_path / "s")
    base = serve(tmp_path / "s", _Slow)
    tiny = [a if a != "0" or TINY_TRAIN[i - 1] != "--workers" else "2" for i, a in enumerate(TINY_TRAIN)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = [*torchrun, "-m", "navit", "train", "--data", f"{base}/index.json", "--out", str(tmp_path), *tiny,
            "--max-tokens", "4", "--seq-len", "4", "--num-seqs", "1", "--buffer-size", "8",  # so examples wait
            "--max-steps", "10", "--save-every", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*args, "--name", "clean"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = losses(tmp_path / "clean")
    assert sorted(reference) == list(range(1, 11))
    assert json.loads((tmp_path / "clean" / "summary.json").read_text())["epochs"] > 2  # ranks crossed epoch ends

    def waiting() -> list[Path]:  # checkpoints taken while examples wait in a packer's buffer
        found = []
        for checkpoint in sorted((tmp_path / "killed" / "checkpoints").glob("step_*")):
            try:
                found += [checkpoint] if any(rank["buffer"] for rank in load_meta(checkpoint)["loader"]) else []
            except (OSError, ValueError, KeyError):  # being written
                pass
        return found

    victim = subprocess.Popen([*args, "--name", "killed"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not waiting():
        time.sleep(0.01)
    for pid in [victim.pid, *descendants(victim.pid)]:  # torchrun, both ranks and their loader workers
        with contextlib.suppress(ProcessLookupError):  # a loader worker may end on its own meanwhile
            os.kill(pid, signal.SIGKILL)
    victim.wait(timeout=30)
    checkpoint = waiting()[-1]
    assert int(load_meta(checkpoint)["step"]) < 10 and not (tmp_path / "killed" / "summary.json").exists()
    resumed = subprocess.run([*args[:-4], "--max-steps", "10", "--resume", str(checkpoint)],
                             capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "killed") == reference


def test_a_clip_in_a_shard_is_decoded_from_its_bytes_like_the_file(tmp_path):
    pytest.importorskip("av")
    from navit.media.video import VideoFile, write_video

    frames = [np.full((24, 40, 3), 30 * t, np.uint8) for t in range(6)]
    write_video(tmp_path / "clip.mp4", frames, fps=6)
    write_tar(tmp_path / "v.tar", [{"__key__": "c0", "mp4": (tmp_path / "clip.mp4").read_bytes(), "cls": b"0"},
                                   {"__key__": "c1", "mp4": b"not a video", "cls": b"0"}])  # fmt: skip
    source = Shards(str(tmp_path / "v.tar"), classes=["still"])
    assert source.provides == {"video", "label"}
    clip, broken = (r.item["video"] for r in source.read(source.parts(0, 0, 1, shuffle=False, seed=0, size=1)[0]))
    ours, theirs = clip.read(num_frames=6), VideoFile(tmp_path / "clip.mp4").read(num_frames=6)
    assert clip.info() == VideoFile(tmp_path / "clip.mp4").info() and len(ours[0]) == 6
    assert [np.asarray(f).tolist() for f in ours[0]] == [np.asarray(f).tolist() for f in theirs[0]]
    with pytest.raises(ValueError, match=r"v.tar:c1.mp4"):
        broken.info()


def test_coco_detection_written_as_shards_reads_back_with_its_boxes(tmp_path):
    from navit.data.coco import CocoDetection
    from navit.data.shard_writer import write_shards
    from navit.synthetic.detection import SyntheticDetection, write_coco_folder

    write_coco_folder(SyntheticDetection(6, seed=2), tmp_path / "coco")
    coco = CocoDetection(tmp_path / "coco")
    write_shards(coco, tmp_path / "shards", max_count=4, progress=False)
    shards = open_source(str(tmp_path / "shards"))
    assert len(shards) == 6 and shards.class_names == coco.class_names
    assert shards.provides == {"image", "boxes", "box_labels"} and shards.provides <= coco.provides
    originals = [coco.item(i) for i in range(len(coco))]
    records = [r for part in shards.parts(0, 0, 1, shuffle=True, seed=0, size=1) for r in shards.read(part)]
    assert len(records) == 6
    for record in records:  # each sample is one of the originals, pixels (PNG bytes kept), boxes and labels
        pixels = np.asarray(record.item["image"])
        original = next(o for o in originals if np.array_equal(np.asarray(o["image"]), pixels))
        assert record.item["boxes"].tolist() == original["boxes"].tolist()
        assert record.item["box_labels"].tolist() == original["box_labels"].tolist()


def test_a_training_run_over_faulty_shards_finishes_and_counts_each_cause(tmp_path, serve):
    from navit.cli import main

    paths = make_shards(tmp_path / "s", counts=[6, 6, 6], index=False)
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes()[:3000])  # truncated after its first sample
    write_tar(tmp_path / "s" / "shard-003.tar", [{"__key__": "nolabel", "png": png(1)}])
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES))
    base = serve(tmp_path / "s")
    tiny = [a if a != "0" or TINY_TRAIN[i - 1] != "--workers" else "2" for i, a in enumerate(TINY_TRAIN)]
    assert main(["train", "--data", f"{base}/shard-{{000..004}}.tar", "--classes", str(tmp_path / "classes.txt"),
                 "--out", str(tmp_path), "--name", "run", *tiny, "--max-steps", "4"]) == 0  # shard-004: a 404
    skipped = json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_examples"]
    assert skipped["cannot read shard <file>: HTTP 404 File not found"] >= 1
    assert skipped["the item has no 'label' (it has image)"] >= 1
    assert any(cause.startswith("shard damaged at <file>") for cause in skipped), skipped
