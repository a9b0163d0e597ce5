"""``navit data shard``: any source written as WebDataset ``.tar`` shards with the files' own bytes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from navit.cli import main
from navit.data.folder import ImageFolder
from navit.data.manifest import Manifest
from navit.data.registry import open_source
from navit.data.shard_writer import ShardWriter, parse_size, write_shards
from navit.data.stream import IndexedSource, split_holdout

CLASSES = ("cat", "dog", "owl")


def _picture(path: Path, seed: int, size: tuple[int, int] = (24, 16)) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three class folders of four small noise pictures each, PNG and JPEG (one named in capitals)."""
    root = tmp_path / "pictures"
    for c, name in enumerate(CLASSES):
        for k in range(4):
            ext = (".png", ".jpg", ".jpeg", ".JPG")[k]
            _picture(root / name / f"{k}{ext}", seed=10 * c + k)
    return root


def read_shards(out: Path) -> tuple[dict, list[list[tuple[str, dict[str, bytes]]]]]:
    """index.json and, per shard in its order, the samples (key, {ext: bytes}) in tar order."""
    index = json.loads((out / "index.json").read_text())
    shards = []
    for entry in index["shards"]:
        samples: list[tuple[str, dict[str, bytes]]] = []
        with tarfile.open(out / entry["url"]) as tar:
            for info in tar.getmembers():
                assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o444)
                key, ext = info.name.split(".", 1)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = tar.extractfile(info).read()
        shards.append(samples)
    return index, shards


def _origins(shards) -> list[str]:
    return [json.loads(fields["json"])["source"] for samples in shards for _, fields in samples]


def test_every_file_is_copied_once_byte_identical_with_its_class(folder, tmp_path):
    out = tmp_path / "shards"
    summary = write_shards(ImageFolder(folder), out, max_count=5, seed=1, spec=str(folder), progress=False)
    index, shards = read_shards(out)
    assert summary["count"] == index["count"] == 12 and summary["shards"] == len(shards) == 3
    assert [e["count"] for e in index["shards"]] == [len(s) for s in shards] == [5, 5, 2]
    assert [e["bytes"] for e in index["shards"]] == [(out / e["url"]).stat().st_size for e in index["shards"]]
    assert [e["url"] for e in index["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert index["format"] == "navit-shards" and index["version"] == 1 and index["source"] == str(folder)
    assert index["classes"] == list(CLASSES) and index["provides"] == ["image", "label"]
    assert (out / "classes.txt").read_text().splitlines() == list(CLASSES)
    samples = [sample for shard in shards for sample in shard]
    assert [key for key, _ in samples] == [f"{i:09d}" for i in range(12)]
    files = {"/".join(p.relative_to(folder).parts): p for p in folder.rglob("*") if p.is_file()}
    assert sorted(_origins(shards)) == sorted(files)  # each file exactly once
    for _, fields in samples:
        origin = json.loads(fields["json"])["source"]
        ext = files[origin].suffix[1:].lower()
        assert set(fields) == {ext, "cls", "json"} and fields[ext] == files[origin].read_bytes()
        assert int(fields["cls"]) == CLASSES.index(origin.split("/")[0])


def test_the_order_is_shuffled_by_the_seed_and_reproducible(folder, tmp_path):
    source = ImageFolder(folder)
    runs = {}
    for name, seed, shuffle in (("a", 3, True), ("b", 3, True), ("c", 4, True), ("kept", 3, False)):
        write_shards(source, tmp_path / name, seed=seed, shuffle=shuffle, max_count=4, progress=False)
        runs[name] = _origins(read_shards(tmp_path / name)[1])
    in_order = [source.key(i) for i in range(len(source))]
    assert runs["kept"] == in_order and runs["a"] != in_order and runs["c"] != runs["a"]
    assert runs["a"] == runs["b"] and sorted(runs["a"]) == sorted(in_order)
    for url in ("shard-000000.tar", "shard-000002.tar"):  # the same bytes, not just the same order
        assert (tmp_path / "a" / url).read_bytes() == (tmp_path / "b" / url).read_bytes()


def test_max_size_rolls_over_and_only_a_lone_oversized_sample_passes_it(tmp_path):
    root = tmp_path / "pictures"
    for k in range(9):  # noise PNGs of about 1 to 24 kB, and one of about 190 kB
        side = 250 if k == 4 else 16 + 10 * k
        _picture(root / CLASSES[k % 3] / f"{k}.png", seed=k, size=(side, side))
    limit = parse_size("64kB")
    summary = write_shards(ImageFolder(root), tmp_path / "out", max_size="64kB", progress=False)
    index, shards = read_shards(tmp_path / "out")
    assert summary["shards"] == len(shards) >= 3 and sum(e["count"] for e in index["shards"]) == 9
    oversized = [e for e in index["shards"] if e["bytes"] > limit]
    assert len(oversized) == 1 and oversized[0]["count"] == 1
    assert all(e["bytes"] % tarfile.RECORDSIZE == 0 for e in index["shards"])


def test_shard_writer_closes_a_shard_before_it_would_pass_the_limit(tmp_path):
    writer = ShardWriter(tmp_path, max_size=3 * tarfile.RECORDSIZE)
    for i in range(6):  # each sample: a 512-byte header and 8 kB of data
        writer.write(f"{i:09d}", {"bin": bytes(8192)})
    shards = writer.close()
    # 3 samples take 3 * 8704 + 1024 end bytes = 27136 <= 30720; a 4th would need 40960
    assert [s["count"] for s in shards] == [3, 3] and [s["bytes"] for s in shards] == [3 * tarfile.RECORDSIZE] * 2
    with pytest.raises(ValueError, match="without dots"):
        ShardWriter(tmp_path).write("a.b", {"png": b""})


@pytest.mark.parametrize("text,size", [("1GB", 10**9), ("500MB", 5 * 10**8), ("64kB", 64_000), ("1GiB", 2**30),
                                       ("1.5MB", 1_500_000), ("12345", 12345), ("2 KiB", 2048)])  # fmt: skip
def test_sizes_are_read_in_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1XB", "-5MB", "GB", "1iB"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError, match="as a size"):
        parse_size(text)


def test_the_webdataset_package_reads_the_shards(folder, tmp_path):
    wds = pytest.importorskip("webdataset")
    write_shards(ImageFolder(folder), tmp_path / "out", max_count=5, progress=False)
    index, shards = read_shards(tmp_path / "out")
    urls = [str(tmp_path / "out" / e["url"]) for e in index["shards"]]
    read = list(wds.WebDataset(urls, shardshuffle=False))
    ours = [(key, fields) for samples in shards for key, fields in samples]
    assert [s["__key__"] for s in read] == [key for key, _ in ours]
    for sample, (_, fields) in zip(read, ours):
        image_ext = next(ext for ext in fields if ext not in ("cls", "json"))
        assert sample[image_ext] == fields[image_ext] and sample["cls"] == fields["cls"]
        Image.open(io.BytesIO(sample[image_ext])).verify()


def test_a_manifest_with_captions_gives_txt_members(folder, tmp_path):
    files = sorted(folder.rglob("*.*"))
    rows = [f"{p.relative_to(folder)},{p.parent.name},a picture of {p.stem} ünïcode" for p in files]
    (folder / "list.csv").write_text("path,label,caption\n" + "\n".join(rows) + "\n", encoding="utf-8")
    write_shards(Manifest(folder / "list.csv"), tmp_path / "out", progress=False)
    index, shards = read_shards(tmp_path / "out")
    assert index["provides"] == ["caption", "image", "label"] and index["count"] == 12
    for _, fields in shards[0]:
        path, line = json.loads(fields["json"])["source"].split("#")
        assert fields["txt"].decode("utf-8") == f"a picture of {Path(path).stem} ünïcode"
        assert rows[int(line) - 2].startswith(path)


def test_a_segmentation_folder_gives_image_and_mask_png(tmp_path):
    from navit.synthetic.segmentation import SyntheticSegmentation, write_segmentation_folder

    write_segmentation_folder(SyntheticSegmentation(4), tmp_path / "seg")
    source = open_source(str(tmp_path / "seg"))
    write_shards(source, tmp_path / "out", progress=False)
    index, shards = read_shards(tmp_path / "out")
    assert index["provides"] == ["image", "label", "mask"] and index["classes"] == source.class_names
    for _, fields in shards[0]:
        name = json.loads(fields["json"])["source"]  # images/000002.png
        assert set(fields) == {"png", "mask.png", "cls", "json"} and fields["cls"] == b"0"
        assert fields["png"] == (tmp_path / "seg" / name).read_bytes()
        assert fields["mask.png"] == (tmp_path / "seg" / name.replace("images/", "masks/")).read_bytes()


def test_a_mask_stored_in_another_format_is_written_as_a_png_of_the_same_values(tmp_path):
    values = np.random.default_rng(0).integers(0, 3, size=(12, 20), dtype=np.uint8)
    _picture(tmp_path / "a.png", seed=1, size=(20, 12))
    Image.fromarray(values).save(tmp_path / "a_mask.bmp")
    (tmp_path / "seg.csv").write_text("path,mask\na.png,a_mask.bmp\n")
    write_shards(open_source(str(tmp_path / "seg.csv")), tmp_path / "out", progress=False)
    ((_, fields),) = read_shards(tmp_path / "out")[1][0]
    assert fields["png"] == (tmp_path / "a.png").read_bytes() and fields["mask.png"].startswith(b"\x89PNG")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(fields["mask.png"]))), values)


def test_a_built_in_set_is_encoded_as_lossless_png(tmp_path):
    source = open_source("synthetic:20")
    write_shards(source, tmp_path / "out", max_count=8, spec="synthetic:20", progress=False)
    index, shards = read_shards(tmp_path / "out")
    assert index["count"] == 20 and index["provides"] == ["caption", "image", "label"]
    for _, fields in [s for shard in shards for s in shard]:
        item = source.item(int(json.loads(fields["json"])["source"]))
        decoded = Image.open(io.BytesIO(fields["png"]))
        assert np.array_equal(np.asarray(decoded), np.asarray(item["image"]))
        assert int(fields["cls"]) == item["label"] and fields["txt"].decode() == item["caption"]


def test_a_built_in_segmentation_set_keeps_its_masks(tmp_path):
    source = open_source("synthetic-seg:3")
    write_shards(source, tmp_path / "out", progress=False)
    for _, fields in read_shards(tmp_path / "out")[1][0]:
        item = source.item(int(json.loads(fields["json"])["source"]))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(fields["mask.png"]))), np.asarray(item["mask"]))


def test_a_built_in_video_set_is_encoded_as_mp4(tmp_path):
    pytest.importorskip("av")
    from navit.media.video import VideoFile

    write_shards(open_source("synthetic-video:2"), tmp_path / "out", progress=False)
    index, shards = read_shards(tmp_path / "out")
    assert index["provides"] == ["label", "video"]
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(shards[0][0][1]["mp4"])
    frames, _ = VideoFile(clip).read(num_frames=2)
    assert frames[0].width >= 16


def test_a_holdout_subset_is_written_with_its_own_items(folder, tmp_path):
    train, val = split_holdout(ImageFolder(folder), 0.3, seed=0)
    write_shards(val, tmp_path / "out", progress=False)
    _, shards = read_shards(tmp_path / "out")
    assert sorted(_origins(shards)) == sorted(val.key(i) for i in range(len(val)))


def test_a_source_without_files_is_refused(tmp_path):
    class Squares(IndexedSource):
        class_names = ["a"]

        def __len__(self):
            return 2

    with pytest.raises(ValueError, match="no files to copy"):
        write_shards(Squares(), tmp_path / "out", progress=False)


def test_the_cli_writes_shards_and_says_what_it_wrote(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["data", "shard", str(folder), "--out", str(out), "--max-count", "5", "--prefix", "train"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    total = sum(p.stat().st_size for p in out.glob("train-*.tar"))
    assert line == f"wrote 12 samples in 3 shards ({total} bytes) to {out}"
    with pytest.raises(SystemExit, match="already holds shards.*--overwrite"):
        main(["data", "shard", str(folder), "--out", str(out)])
    assert main(["data", "shard", str(folder), "--out", str(out), "--prefix", "train", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "index.json", "train-000000.tar"]
    with pytest.raises(SystemExit):
        main(["data", "shard", str(folder), "--out", str(tmp_path / "x"), "--max-size", "lots"])


def test_an_unreadable_file_is_skipped_and_counted_or_stops_the_run(folder, tmp_path, capsys):
    rows = [f"{p.relative_to(folder)},{p.parent.name}" for p in sorted(folder.rglob("*.*"))]
    (folder / "list.csv").write_text("path,label\n" + "\n".join(rows + ["gone.png,cat"]) + "\n")
    summary = write_shards(Manifest(folder / "list.csv"), tmp_path / "out", max_count=3, progress=False)
    assert summary["count"] == 12 and summary["skipped"] == {"FileNotFoundError": 1}
    assert "gone.png" in summary["failures"][0]
    assert main(["data", "shard", str(folder / "list.csv"), "--out", str(tmp_path / "cli")]) == 0
    assert "skipped 1 unreadable item(s) (1 FileNotFoundError)" in capsys.readouterr().err
    stopped = tmp_path / "stopped"
    with pytest.raises(ValueError, match="cannot read .*gone.png"):
        write_shards(Manifest(folder / "list.csv"), stopped, max_count=3, fail_fast=True, shuffle=False, progress=False)
    assert list(stopped.iterdir()) == []  # the shards written before it are gone, and no index
