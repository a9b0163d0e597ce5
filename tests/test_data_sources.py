"""Data sources (ImageFolder, Manifest, TarShards, Subset, holdout, parts, the registry) and load_rgb."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from navit.data.folder import ImageFolder
from navit.data.labels import with_class_names
from navit.data.manifest import Manifest
from navit.data.registry import open_source, register_source, unregister_source
from navit.data.stream import IndexedSource, Source, Subset, holdout_side, split_holdout
from navit.data.webdataset import Shards
from navit.media.image import load_rgb
from navit.synthetic.shapes import CLASS_NAMES, SyntheticShapes, write_image_folder
from navit.media.image import BACKGROUND_RGB


def _solid(color, size=(12, 8)) -> Image.Image:
    return Image.new("RGB", size, color)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# load_rgb
# ---------------------------------------------------------------------------------------------
def _mode_cases():
    w, h = 10, 6
    cases = []
    # (name, image, format, expected RGB of pixel (0, 0), expected RGB of pixel (w-1, h-1))
    gray = Image.new("L", (w, h), 200)
    gray.putpixel((w - 1, h - 1), 10)
    cases.append(("L", gray, "PNG", (200,) * 3, (10,) * 3))

    la = Image.new("LA", (w, h), (255, 255))
    la.putpixel((w - 1, h - 1), (0, 0))  # fully transparent -> background
    cases.append(("LA", la, "PNG", (255,) * 3, BACKGROUND_RGB))

    p = Image.new("P", (w, h), 1)
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    p.putpixel((w - 1, h - 1), 2)
    cases.append(("P", p, "PNG", (255, 0, 0), (0, 0, 255)))

    pt = p.copy()
    pt.info["transparency"] = 2  # palette entry 2 is transparent
    cases.append(("P+transparency", pt, "PNG", (255, 0, 0), BACKGROUND_RGB))

    rgba = Image.new("RGBA", (w, h), (0, 255, 0, 255))
    rgba.putpixel((w - 1, h - 1), (255, 255, 255, 0))
    cases.append(("RGBA", rgba, "PNG", (0, 255, 0), BACKGROUND_RGB))

    half = Image.new("RGBA", (w, h), (0, 0, 0, 128))  # half-transparent black over grey
    half.putpixel((w - 1, h - 1), (255, 255, 255, 255))
    expect = tuple(round(c * 127 / 255) for c in BACKGROUND_RGB)
    cases.append(("RGBA-half", half, "PNG", expect, (255, 255, 255)))

    cmyk = Image.new("CMYK", (w, h), (0, 255, 255, 0))  # pure red
    cmyk.putpixel((w - 1, h - 1), (0, 0, 0, 255))  # black
    cases.append(("CMYK", cmyk, "TIFF", (255, 0, 0), (0, 0, 0)))

    i16 = Image.new("I;16", (w, h), 65535)
    i16.putpixel((w - 1, h - 1), 32896)  # half range -> 128, not clipped to 255
    cases.append(("I;16", i16, "PNG", (255,) * 3, (128,) * 3))

    i32 = Image.fromarray(np.full((h, w), 65535, dtype=np.int32))
    i32.putpixel((w - 1, h - 1), 16448)  # 16-bit data stored as I -> quarter range -> 64
    cases.append(("I", i32, "TIFF", (255,) * 3, (64,) * 3))

    f01 = Image.fromarray(np.full((h, w), 1.0, dtype=np.float32))
    f01.putpixel((w - 1, h - 1), 0.5)
    cases.append(("F[0,1]", f01, "TIFF", (255,) * 3, (128,) * 3))

    fwide = Image.fromarray(np.full((h, w), -1000.0, dtype=np.float32))
    fwide.putpixel((0, 0), 1000.0)
    fwide.putpixel((w - 1, h - 1), 0.0)  # out-of-range floats are normalised, not clipped
    cases.append(("F-wide", fwide, "TIFF", (255,) * 3, (128,) * 3))

    one = Image.new("1", (w, h), 1)
    one.putpixel((w - 1, h - 1), 0)
    cases.append(("1", one, "PNG", (255,) * 3, (0,) * 3))
    return cases


@pytest.mark.parametrize("case", _mode_cases(), ids=lambda c: c[0])
def test_load_rgb_converts_every_mode(case, tmp_path):
    name, img, fmt, first, last = case
    data = _encode(img, fmt)
    assert Image.open(io.BytesIO(data)).mode.split(";")[0] in img.mode  # really stored that way
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(data)
    for src in (path, str(path), data):
        out = load_rgb(src)
        assert out.mode == "RGB" and out.size == img.size, name
        px = np.asarray(out)
        assert np.abs(px[0, 0].astype(int) - first).max() <= 1, (name, px[0, 0], first)
        assert np.abs(px[-1, -1].astype(int) - last).max() <= 1, (name, px[-1, -1], last)


def test_load_rgb_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    assert Image.open(path).size == (40, 20)
    out = load_rgb(path)
    assert out.size == (20, 40)
    px = np.asarray(out).astype(int)
    assert px[2, 10, 0] > 200 and px[2, 10, 2] < 60  # left (red) is now on top
    assert px[-3, 10, 2] > 200 and px[-3, 10, 0] < 60


def test_load_rgb_takes_first_frame_of_animation(tmp_path):
    frames = [_solid((255, 0, 0)), _solid((0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 2
    out = load_rgb(path)
    assert out.mode == "RGB" and tuple(np.asarray(out)[0, 0]) == (255, 0, 0)
    webp = tmp_path / "anim.webp"
    frames[1].save(webp, save_all=True, append_images=frames[:1], lossless=True)
    assert tuple(np.asarray(load_rgb(webp))[0, 0]) == (0, 0, 255)


def test_load_rgb_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.png.*empty"):
        load_rgb(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    with pytest.raises(ValueError, match=r"notes\.jpg"):
        load_rgb(text)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_encode(SyntheticShapes(1).load(0), "PNG")[:200])
    with pytest.raises(ValueError, match=r"cut\.png"):
        load_rgb(truncated)
    with pytest.raises(ValueError, match="shard.tar:x.jpg"):
        load_rgb(b"garbage", name="shard.tar:x.jpg")
    with pytest.raises(ValueError, match="empty"):
        load_rgb(b"")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_rgb(tmp_path / "missing.png")


def test_load_rgb_keeps_decompression_bomb_protection(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 px > 2 * 100: Pillow refuses
    with pytest.raises(Image.DecompressionBombError, match=r"big\.png.*MAX_IMAGE_PIXELS"):
        load_rgb(path)


# ---------------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------------
def test_write_image_folder_round_trip(tmp_path):
    synth = SyntheticShapes(24, seed=5)
    write_image_folder(synth, tmp_path / "tree", progress=False)
    folder = ImageFolder(tmp_path / "tree")
    assert isinstance(folder, Source)
    assert folder.class_names == list(CLASS_NAMES)
    assert len(folder) == 24
    seen = set()
    for j in range(len(folder)):
        i = int(os.path.splitext(os.path.basename(folder.describe(j)))[0])
        seen.add(i)
        assert folder.label(j) == synth.label(i)
        assert np.array_equal(np.asarray(folder.load(j)), np.asarray(synth.load(i)))
    assert seen == set(range(24))
    # Deterministic order: a second scan lists the same files.
    again = ImageFolder(tmp_path / "tree")
    assert [again.describe(j) for j in range(24)] == [folder.describe(j) for j in range(24)]


def test_image_folder_recursive_filtered_sorted(tmp_path):
    root = tmp_path / "data"
    (root / "dog").mkdir(parents=True)
    (root / "cat" / "sub").mkdir(parents=True)
    (root / ".cache").mkdir()
    _solid((1, 2, 3)).save(root / "cat" / "b.JPG", format="JPEG")
    _solid((4, 5, 6)).save(root / "cat" / "sub" / "a.png")
    _solid((7, 8, 9)).save(root / "cat" / "a.tiff")
    (root / "cat" / "readme.txt").write_text("not an image")
    _solid((9, 9, 9)).save(root / "dog" / "z.webp")
    _solid((9, 9, 9)).save(root / ".cache" / "x.png")
    (root / "notes.txt").write_text("not media: ignored")
    (root / "cat" / "sub" / "loop").symlink_to("..")  # a link back up is walked once, not forever
    (root / "cat" / ".hidden").symlink_to(root / "dog")
    src = ImageFolder(root)
    assert src.class_names == ["cat", "dog"]
    rel = [os.path.relpath(src.describe(i), root) for i in range(len(src))]
    assert rel == [
        os.path.join("cat", "a.tiff"),
        os.path.join("cat", "b.JPG"),
        os.path.join("cat", "sub", "a.png"),
        os.path.join("dog", "z.webp"),
    ]
    assert [src.label(i) for i in range(len(src))] == [0, 0, 0, 1]
    assert src.load(2).getpixel((0, 0)) == (4, 5, 6)
    assert pickle.loads(pickle.dumps(src)).load(3).size == (12, 8)
    with pytest.raises(IndexError):
        src.label(4)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    _solid((0, 0, 0)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolder(tmp_path / "flat")
    (tmp_path / "tree" / "good").mkdir(parents=True)
    (tmp_path / "tree" / "empty_class").mkdir()
    (tmp_path / "tree" / "empty_class" / "x.txt").write_text("x")
    _solid((0, 0, 0)).save(tmp_path / "tree" / "good" / "a.png")
    with pytest.raises(ValueError, match="empty_class"):
        ImageFolder(tmp_path / "tree")
    (tmp_path / "tree" / "empty_class" / "b.png").write_bytes(b"")
    for name in ("stray.png", "clip.MP4"):
        (tmp_path / "tree" / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds 2 image or video file\(s\) outside the class folders \(clip.MP4, stray.png\)"):
        ImageFolder(tmp_path / "tree")


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------
def _make_images(folder, colors):
    folder.mkdir(parents=True, exist_ok=True)
    for k, c in enumerate(colors):
        _solid(c).save(folder / f"{k}.png")


def test_manifest_csv_names_and_relative_paths(tmp_path):
    _make_images(tmp_path / "imgs", [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(
        "path,label,extra\n"
        "imgs/0.png,zebra,x\n"
        f"{tmp_path / 'imgs' / '1.png'},apple,y\n"
        "\n"
        "imgs/2.png,zebra,z\n"
    )
    m = Manifest(csv_path)
    assert m.class_names == ["apple", "zebra"]
    assert [m.label(i) for i in range(3)] == [1, 0, 1]
    assert m.load(2).getpixel((0, 0)) == (0, 0, 255)
    assert "line 5" in m.describe(2) and "train.csv" in m.describe(2)
    # class_names fixes the numbering; digit strings that are not names are indices.
    m2 = Manifest(csv_path, class_names=["zebra", "apple"])
    assert [m2.label(i) for i in range(3)] == [0, 1, 0]
    # root overrides the folder relative paths are resolved against.
    (tmp_path / "elsewhere").mkdir()
    rel = tmp_path / "elsewhere" / "m.csv"
    rel.write_text("path,label\nimgs/1.png,0\nimgs/0.png,3\n")
    m3 = Manifest(rel, root=tmp_path)
    assert m3.class_names == ["0", "1", "2", "3"] and m3.label(1) == 3
    assert m3.load(0).getpixel((0, 0)) == (0, 255, 0)


def test_manifest_jsonl(tmp_path):
    _make_images(tmp_path, [(10, 10, 10), (20, 20, 20)])
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"path": "0.png", "label": 2}) + "\n\n" + json.dumps({"path": "1.png", "label": 0}) + "\n")
    m = Manifest(path)
    assert m.class_names == ["0", "1", "2"] and [m.label(0), m.label(1)] == [2, 0]
    assert m.load(1).getpixel((0, 0)) == (20, 20, 20)
    assert "line 3" in m.describe(1)
    named = tmp_path / "n.jsonl"
    named.write_text('{"path": "0.png", "label": "b"}\n{"path": "1.png", "label": "a"}\n')
    assert Manifest(named).class_names == ["a", "b"]
    assert pickle.loads(pickle.dumps(Manifest(named))).label(0) == 1


@pytest.mark.parametrize(
    "filename, text, pattern",
    [
        ("a.csv", "file,label\nx.png,1\n", r"a\.csv, line 1.*path"),
        ("b.csv", "path,label\nx.png,1\ny.png\n", r"b\.csv, line 3"),
        ("c.csv", "", r"c\.csv.*empty"),
        ("d.csv", "path,label\n", r"d\.csv lists no images"),
        ("e.jsonl", '{"path": "x.png", "label": 1}\n{"path": "y.png", "label": 1\n', r"e\.jsonl, line 2.*JSON"),
        ("f.jsonl", '{"path": "x.png"}\n', r"f\.jsonl, line 1.*label"),
        ("g.jsonl", '{"path": "x.png", "label": "cat"}\n{"path": "y.png", "label": 3}\n', r"g\.jsonl, line 2.*mixed"),
        ("h.jsonl", '[1, 2]\n', r"h\.jsonl, line 1"),
        ("i.jsonl", '{"path": "x.png", "label": -1}\n', r"i\.jsonl, line 1.*negative"),
        ("j.txt", "path,label\nx.png,1\n", r"j\.txt.*format"),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path, filename, text, pattern):
    path = tmp_path / filename
    path.write_text(text)
    with pytest.raises(ValueError, match=pattern):
        Manifest(path)


def test_manifest_unknown_class_and_missing_image(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,label\nx.png,cat\ny.png,cow\n")
    with pytest.raises(ValueError, match=r"m\.csv, line 3.*cow"):
        Manifest(path, class_names=["cat", "dog"])
    with pytest.raises(ValueError, match=r"line 2.*out of range"):
        (tmp_path / "k.csv").write_text("path,label\nx.png,5\n")
        Manifest(tmp_path / "k.csv", class_names=["cat", "dog"])
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        Manifest(tmp_path / "nope.csv")
    m = Manifest(path)
    with pytest.raises(FileNotFoundError, match=r"x\.png"):
        m.load(0)


def test_manifest_captions_csv_and_jsonl(tmp_path):
    _make_images(tmp_path, [(10, 10, 10), (20, 20, 20), (30, 30, 30)])
    csv_path = tmp_path / "c.csv"
    csv_path.write_text(
        'path,caption,label\n0.png,"a tall, dark ellipse",cat\n1.png,  naïve café  ,dog\n2.png,,cat\n'
    )
    m = Manifest(csv_path)
    assert m.has_captions and m.class_names == ["cat", "dog"] and [m.label(i) for i in range(3)] == [0, 1, 0]
    assert m.caption(0) == "a tall, dark ellipse" and m.caption(1) == "naïve café"
    with pytest.raises(ValueError, match=r"c\.csv, line 4.*caption"):
        m.caption(2)  # this row's caption is empty
    with pytest.raises(IndexError):
        m.caption(3)
    assert pickle.loads(pickle.dumps(m)).caption(1) == "naïve café"

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(
        json.dumps({"path": "0.png", "label": 1, "caption": "a wide rectangle"}) + "\n\n"
        + json.dumps({"path": "1.png", "label": 0}) + "\n"
        + json.dumps({"path": "2.png", "label": 0, "caption": 5}) + "\n"
    )
    j = Manifest(jsonl)
    assert j.has_captions and j.caption(0) == "a wide rectangle" and j.label(0) == 1
    with pytest.raises(ValueError, match=r"c\.jsonl, line 3.*caption"):
        j.caption(1)  # no caption key on this line
    with pytest.raises(ValueError, match=r"line 4.*not a string"):
        j.caption(2)
    # Subsets (splits, shards) pass captions through.
    assert Subset(j, [2, 0]).caption(1) == "a wide rectangle"


def test_manifest_without_captions_says_so(tmp_path):
    _make_images(tmp_path, [(10, 10, 10)])
    for name, text in (("n.csv", "path,label\n0.png,0\n"), ("n.jsonl", '{"path": "0.png", "label": 0}\n')):
        (tmp_path / name).write_text(text)
        m = Manifest(tmp_path / name)
        assert not m.has_captions
        with pytest.raises(ValueError, match=r"has no captions.*caption"):
            m.caption(0)
        assert m.label(0) == 0 and m.load(0).getpixel((0, 0)) == (10, 10, 10)
        assert "caption" not in m.provides
    # A Subset of a source without captions (an ImageFolder) says so too.
    _make_images(tmp_path / "folder" / "a", [(1, 2, 3)])
    assert "caption" not in Subset(ImageFolder(tmp_path / "folder"), [0]).provides


# Shards read as streams (more in test_shards.py)
# ---------------------------------------------------------------------------------------------
def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_shards(folder, with_classes=False, mode="w"):
    folder.mkdir(parents=True, exist_ok=True)
    imgs = {
        "s0/a": _solid((255, 0, 0), (16, 9)),
        "s0/b": _solid((0, 255, 0), (9, 16)),
        "s1/c": _solid((0, 0, 255), (5, 5)),
    }
    with tarfile.open(folder / "shard-000.tar", mode) as tf:
        _add(tf, "s0/a.jpg", _encode(imgs["s0/a"], "JPEG", quality=95))
        _add(tf, "s0/a.cls", b"2\n")
        _add(tf, "s0/b.json", json.dumps({"label": "cat" if with_classes else 0}).encode())
        _add(tf, "s0/b.png", _encode(imgs["s0/b"], "PNG"))
    with tarfile.open(folder / "shard-001.tar", mode) as tf:
        _add(tf, "s1/c.webp", _encode(imgs["s1/c"], "WEBP", lossless=True))
        _add(tf, "s1/c.cls", b"1")
        _add(tf, "s1/caption_only.txt", b"just text")
    if with_classes:
        (folder / "classes.txt").write_text("cat\ndog\nemu\n")
    return imgs


def _records(source) -> dict:
    return {r.key: r for p in source.parts(0, 0, 1, shuffle=False, seed=0, size=1) for r in source.read(p)}


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_tar_shards_round_trip(tmp_path, mode):
    imgs = _write_shards(tmp_path / "shards", mode=mode)
    src = open_source(str(tmp_path / "shards" / "*.tar"))
    assert isinstance(src, Shards) and src.class_names == [] and src.provides == {"image", "label"}
    records = _records(src)
    assert [records[k].item["label"] for k in ("s0/a", "s0/b", "s1/c")] == [2, 0, 1]
    assert records["s0/a"].name.endswith("shard-000.tar:s0/a") and records["s1/c"].name.endswith("shard-001.tar:s1/c")
    for key, image in imgs.items():
        out = records[key].item["image"]
        assert out.mode == "RGB" and out.size == image.size
        assert np.abs(np.asarray(out).astype(int) - np.asarray(image).astype(int)).max() <= 3  # JPEG is lossy
    assert "no image or clip" in str(records["s1/caption_only"].error)  # counted by the loader, not dropped
    # A list of paths and a brace range name the same shards; the source survives pickling.
    listed = Shards([tmp_path / "shards" / "shard-000.tar", tmp_path / "shards" / "shard-001.tar"])
    braced = open_source(str(tmp_path / "shards" / "shard-{000..001}.tar"))
    for other in (listed, braced, pickle.loads(pickle.dumps(src))):
        assert other.urls == src.urls and sorted(_records(other)) == sorted(records)


def test_tar_shards_classes_txt_and_json_names(tmp_path):
    _write_shards(tmp_path, with_classes=True)
    src = Shards(sorted(str(p) for p in tmp_path.glob("*.tar")))
    assert src.class_names == ["cat", "dog", "emu"]
    assert [_records(src)[k].item["label"] for k in ("s0/a", "s0/b", "s1/c")] == [2, 0, 1]


def test_tar_shards_errors(tmp_path):
    with tarfile.open(tmp_path / "bad.tar", "w") as tf:
        _add(tf, "k1.png", _encode(_solid((0, 0, 0)), "PNG"))
        _add(tf, "k1.cls", b"dog")
        _add(tf, "img.v2.png", _encode(_solid((0, 0, 0)), "PNG"))  # keys end at the first dot: "img" has v2.png
        _add(tf, "k4.jpg", b"not a jpeg at all")
        _add(tf, "k4.cls", b"0")
    records = _records(Shards([tmp_path / "bad.tar"]))
    assert "bad.tar:k1.cls: 'dog' is not a class index or a known class name (labels given as class names need" \
        in str(records["k1"].error)
    assert "the sample has no image or clip (fields: v2.png)" in str(records["img"].error)
    assert "bad.tar:k4.jpg" in str(records["k4"].error)
    with pytest.raises(FileNotFoundError, match="no shards match"):
        Shards(str(tmp_path / "none-*.tar"))
    with pytest.raises(FileNotFoundError, match=r"missing\.tar"):
        Shards([tmp_path / "missing.tar"])


# ---------------------------------------------------------------------------------------------
# Subset, split_holdout, shard, open_source
# ---------------------------------------------------------------------------------------------
def test_subset_protocol_and_flattening():
    base = SyntheticShapes(30, seed=1)
    sub = Subset(base, [5, 7, 9, 11])
    assert isinstance(sub, Source) and isinstance(base, Source)
    assert len(sub) == 4 and sub.class_names == base.class_names and sub.provides == base.provides
    assert sub.label(1) == base.label(7) and sub.describe(1) == base.describe(7) and sub.key(1) == "7"
    assert np.array_equal(np.asarray(sub.item(3)["image"]), np.asarray(base.item(11)["image"]))
    nested = Subset(sub, [3, 0])
    assert nested.source is base and nested.indices == [11, 5]


def test_holdout_by_key_hash_needs_no_labels_and_is_stable():
    base = SyntheticShapes(600, seed=2)
    rest, hold = split_holdout(base, 0.1, seed=0)
    assert 40 <= len(hold) <= 80 and len(rest) + len(hold) == 600
    assert set(rest.indices).isdisjoint(hold.indices)
    assert all(holdout_side(base.key(i), 0.1, 0) for i in hold.indices)
    rest2, hold2 = split_holdout(base, 0.1, seed=0)
    assert hold2.indices == hold.indices and rest2.indices == rest.indices
    _, hold3 = split_holdout(base, 0.1, seed=1)
    assert hold3.indices != hold.indices
    # An item stays on its side when others are added: the split is a function of its key.
    _, bigger = split_holdout(SyntheticShapes(900, seed=2), 0.1, seed=0)
    assert set(hold.indices) == {i for i in bigger.indices if i < 600}

    class Unlabelled(SyntheticShapes):
        def label(self, index):
            raise AssertionError("the split must not read labels")

        def item(self, index):
            raise AssertionError("the split must not read items")

    split_holdout(Unlabelled(50), 0.2, seed=0)
    for bad in (0, 0.0, 1, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            split_holdout(base, bad, seed=0)
    with pytest.raises(ValueError, match="no validation item"):
        split_holdout(SyntheticShapes(1), 0.01, seed=0)


def test_parts_are_disjoint_over_ranks_and_cover_each_epoch():
    base = SyntheticShapes(103)
    for world in (1, 2, 3, 4, 8):
        ranks = [base.parts(5, r, world, shuffle=True, seed=1, size=4) for r in range(world)]
        flat = [i for parts in ranks for part in parts for i in part.spec]
        assert sorted(flat) == list(range(103)) and len(set(flat)) == 103
        counts = [sum(len(part.spec) for part in parts) for parts in ranks]
        assert max(counts) - min(counts) <= 1
        assert all(len(part.spec) <= 4 for parts in ranks for part in parts)
    first, again = base.parts(0, 0, 1, shuffle=True, seed=1, size=8), base.parts(0, 0, 1, shuffle=True, seed=1, size=8)
    assert first == again and first != base.parts(1, 0, 1, shuffle=True, seed=1, size=8)
    assert [i for part in base.parts(0, 0, 1, shuffle=False, seed=1, size=8) for i in part.spec] == list(range(103))
    records = list(base.read(first[0], start=3))
    assert [r.key for r in records] == [str(i) for i in first[0].spec[3:]] and records[0].item["label"] == base.label(first[0].spec[3])


def test_registry_opens_plug_in_schemes_and_lists_the_forms():
    class Two(IndexedSource):
        class_names = ["a"]

        def __len__(self):
            return 2

        def item(self, index):
            return {"image": Image.new("RGB", (8, 8)), "label": 0}

    register_source("two", lambda spec: Two(), scheme=True, form="two:")
    try:
        assert isinstance(open_source("two:"), Two)
        with pytest.raises(FileNotFoundError, match="two:"):
            open_source("no/such/place")
    finally:
        unregister_source("two")
    with pytest.raises(FileNotFoundError) as error:
        open_source("no/such/place")
    assert "two:" not in str(error.value) and "synthetic" in str(error.value)


def test_open_source_dispatch_and_errors(tmp_path):
    write_image_folder(SyntheticShapes(6), tmp_path / "tree", progress=False)
    assert isinstance(open_source(str(tmp_path / "tree")), ImageFolder)
    (tmp_path / "m.csv").write_text("path,label\ntree/round_ellipse/x.png,0\n")
    assert isinstance(open_source(str(tmp_path / "m.csv")), Manifest)
    (tmp_path / "m.jsonl").write_text('{"path": "x.png", "label": 0}\n')
    assert isinstance(open_source(str(tmp_path / "m.jsonl")), Manifest)
    _write_shards(tmp_path / "sh")
    assert len(_records(open_source(str(tmp_path / "sh" / "shard-*.tar")))) == 4
    assert len(open_source("synthetic:7:3")) == 7 and open_source("synthetic-seg:2").provides == {"image", "mask", "label"}
    with pytest.raises(ValueError, match="bad synthetic spec"):
        open_source("synthetic:x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(str(tmp_path / "nothing_here"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="cannot open data source"):
        open_source(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError):
        open_source("")


def test_every_source_gives_items_as_dicts(tmp_path):
    """``item(i)`` is the image, the label and whatever else the source has (a caption)."""
    _make_images(tmp_path / "imgs", [(255, 0, 0), (0, 255, 0)])
    (tmp_path / "m.csv").write_text("path,label,caption\nimgs/0.png,a,red square\nimgs/1.png,b,green one\n")
    write_image_folder(SyntheticShapes(6, seed=1, max_side=40), tmp_path / "folder", progress=False)
    sources = {
        "manifest": Manifest(tmp_path / "m.csv"),
        "folder": ImageFolder(tmp_path / "folder"),
        "synthetic": SyntheticShapes(6, seed=1, max_side=40),
    }
    for name, source in sources.items():
        for i in range(len(source)):
            item = source.item(i)
            assert item["label"] == source.label(i), name
            assert np.array_equal(np.asarray(item["image"]), np.asarray(source.load(i))), name
        assert {"image", "label"} <= source.provides, name
    assert sources["manifest"].item(1)["caption"] == "green one"
    assert sources["synthetic"].item(2)["caption"] == sources["synthetic"].caption(2)
    assert "caption" not in sources["folder"].item(0) and "caption" not in sources["folder"].provides
    assert "caption" in sources["manifest"].provides
    sub = Subset(sources["synthetic"], [4, 2])
    assert sub.item(1)["caption"] == sources["synthetic"].caption(2)


def test_with_class_names_matches_classes_by_name(tmp_path):
    full = sorted(CLASS_NAMES)
    write_image_folder(SyntheticShapes(12, seed=2, max_side=40), tmp_path / "all", progress=False)
    # A folder that lacks the first two classes: its own numbering starts at the third class.
    partial = tmp_path / "partial"
    partial.mkdir()
    for folder in sorted((tmp_path / "all").iterdir())[2:]:
        folder.rename(partial / folder.name)
    source = ImageFolder(partial)
    assert source.class_names == full[2:] and source.label(0) == 0
    matched = with_class_names(source, full)
    assert matched.class_names == full
    for i in range(len(source)):
        name = os.path.basename(os.path.dirname(source.describe(i)))
        assert full[matched.label(i)] == name and full[matched.item(i)["label"]] == name
    assert with_class_names(source, source.class_names) is source  # nothing to match
    with pytest.raises(ValueError, match=r"--data x has classes \['tall_ellipse'\] that the model does not know"):
        with_class_names(source, [n for n in full if n != "tall_ellipse"], "--data x")
