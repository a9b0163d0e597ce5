"""The packing loader: fixed shapes, nothing lost, deterministic, resumable mid-epoch."""

import pytest

from navit.data.loader import DropSchedule, PackedLoader
from navit.synthetic.shapes import SyntheticShapes
from navit.data.transforms import ExampleTransform, ResolutionSampler
from navit.processor import Processor
from navit.token_drop import ConstantRate, TokenDropper


def make_loader(num_images=48, workers=0, **overrides):
    options = dict(
        source=SyntheticShapes(num_images=num_images, seed=3, max_side=160),
        transform=ExampleTransform(
            Processor(patch_size=16, max_tokens=32), ResolutionSampler(res_mode="side", res_min=32, res_max=128)
        ),
        seq_len=64,
        num_seqs=2,
        max_examples_per_seq=8,
        buffer_size=16,
        seed=7,
        num_workers=workers,
        chunk_size=4,
    )
    options.update(overrides)
    return PackedLoader(**options)


def batch_signature(item):
    return (item.indices.tolist(), item.batch.segment_ids.tolist(), item.batch.patches.sum().item())


def test_every_image_once_per_epoch_with_fixed_shapes():
    loader = make_loader()
    seen = []
    for item in loader:
        assert item.batch.patches.shape[:2] == (2, 64)
        assert item.batch.slot_to_example.shape == (2, 8)
        assert item.targets["label"].shape == item.indices.shape == (item.batch.num_examples,)
        seen += item.indices.tolist()
    assert sorted(seen) == list(range(48))
    assert loader.epoch == 1


def test_targets_follow_output_rows():
    loader = make_loader()
    source = loader.source
    for item in loader:
        assert item.targets["label"].tolist() == [source.label(i) for i in item.indices.tolist()]
    # A task's own targets (here: label and caption) travel the same way.
    loader = make_loader(targets=lambda item: {"label": item["label"], "caption": item["caption"]})
    for item in loader:
        assert item.targets["caption"] == [source.caption(i) for i in item.indices.tolist()]


def test_deterministic_and_independent_of_worker_count():
    a = [batch_signature(item) for item in make_loader(workers=0)]
    b = [batch_signature(item) for item in make_loader(workers=2)]
    assert a == b
    c = [batch_signature(item) for item in make_loader(seed=8)]
    assert a != c


def test_epochs_reshuffle():
    loader = make_loader()
    first = [item.indices.tolist() for item in loader]
    second = [item.indices.tolist() for item in loader]
    assert first != second


def test_resume_mid_epoch_reproduces_the_rest():
    reference = [batch_signature(item) for item in make_loader()]
    loader = make_loader()
    stream = iter(loader)
    for _ in range(3):
        next(stream)
    state = loader.state_dict()
    resumed = make_loader()
    resumed.load_state_dict(state)
    assert [batch_signature(item) for item in resumed] == reference[3:]


def test_token_dropping_in_training_only():
    dropper = TokenDropper(ConstantRate(0.5), seed=0)
    kept = sum(item.batch.num_real_tokens for item in make_loader(dropper=dropper))
    full = sum(item.batch.num_real_tokens for item in make_loader())
    assert 0.4 < kept / full < 0.6
    evaluation = make_loader(dropper=TokenDropper(ConstantRate(0.5)), train=False)
    assert sum(item.batch.num_real_tokens for item in evaluation) == sum(
        item.batch.num_real_tokens for item in make_loader(train=False)
    )


def test_sigmoid_drop_schedule_moves_from_start_to_end():
    schedule = DropSchedule("sigmoid", start=1.0, end=0.0)
    values = [schedule(t / 10) for t in range(11)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[5] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="drop schedule"):
        DropSchedule("cosine")


def test_bad_images_are_skipped_and_counted(tmp_path):
    class Broken(SyntheticShapes):
        def item(self, index):
            if index % 5 == 0:
                raise ValueError(f"cannot decode image broken-{index}.png")
            return super().item(index)

    source = Broken(num_images=20, seed=0, max_side=96)
    loader = make_loader(source=source)
    with pytest.warns(UserWarning, match="skipping synthetic"):
        seen = [i for item in loader for i in item.indices.tolist()]
    assert sorted(seen) == [i for i in range(20) if i % 5]
    assert sum(loader.skipped.values()) == 4
    with pytest.raises(ValueError, match="broken-0"):
        list(make_loader(source=source, fail_fast=True))


def test_skips_are_counted_by_cause_and_a_file_gone_bad_before_a_resume_is_skipped(tmp_path):
    import warnings

    from PIL import Image

    from navit.data.sources import ImageFolder

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(6):
            Image.new("RGB", (32 + i, 40), (i * 20, 0, 0)).save(tmp_path / name / f"{i}.png")
        (tmp_path / name / "empty.png").write_bytes(b"")
    (tmp_path / "a" / "junk.png").write_text("junk")
    source = ImageFolder(tmp_path)
    make = lambda: PackedLoader(source, ExampleTransform(Processor(patch_size=16, max_tokens=16)), seq_len=16,  # noqa: E731
                                num_seqs=1, buffer_size=8, num_workers=0, chunk_size=4, seed=1)  # fmt: skip
    loader = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(loader)
        # Two empty files are one cause (the names are in the warnings, not in the counts).
        assert dict(loader.skipped) == {"cannot decode image <file>: the file is empty (0 bytes)": 2,
                                        "cannot decode image <file>: not an image format Pillow recognises": 1}  # fmt: skip
        loader = make()
        stream = iter(loader)
        next(stream)
        state = loader.state_dict()
        broken = source.path(state["buffer"][0][0])
        with open(broken, "wb"):  # emptied between the save and the resume
            pass
        resumed = make()
        resumed.load_state_dict(state)
        seen = [i for batch in resumed for i in batch.indices.tolist()]
    assert source.path(state["buffer"][0][0]) not in {source.path(i) for i in seen}
    assert sum(resumed.skipped.values()) == 3 + 1, "the epoch's three bad files and the one gone bad"


def test_impossible_loader_settings_fail_early():
    with pytest.raises(ValueError, match="32 tokens, which exceeds seq_len=16"):
        make_loader(seq_len=16)
    with pytest.raises(ValueError, match="empty"):
        make_loader(source=SyntheticShapes(num_images=0))
