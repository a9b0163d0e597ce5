"""The packing loader: fixed shapes, nothing lost, deterministic for any number of workers,
resumable mid-epoch with the buffer as it was, ranks disjoint."""

import warnings

import pytest
from PIL import Image

from navit.data.folder import ImageFolder
from navit.data.loader import PackedLoader
from navit.ops import ResolutionSampler, train_chain
from navit.packing import PackingConfig
from navit.processor import Processor
from navit.synthetic.shapes import SyntheticShapes
from navit.token_drop import ConstantRate, DropSchedule, TokenDropper


def make_loader(num_images=48, workers=0, dropper=None, packing=None, **overrides):
    options = dict(
        source=SyntheticShapes(num_images=num_images, seed=3, max_side=160),
        chain=train_chain(Processor(patch_size=16, max_tokens=32), crop_min=0.6, flip=True, dropper=dropper,
                          resolution=ResolutionSampler(res_mode="side", res_min=32, res_max=128)),
        packing=packing or PackingConfig(seq_len=64, num_seqs=2, max_examples_per_seq=8, buffer_size=16),
        seed=7,
        num_workers=workers,
        chunk_size=4,
    )
    options.update(overrides)
    return PackedLoader(**options)


def signature(item):
    return (item.keys, item.batch.segment_ids.tolist(), item.batch.patches.sum().item())


def test_every_item_once_per_epoch_with_fixed_shapes():
    loader = make_loader()
    seen = []
    for item in loader:
        assert item.batch.patches.shape[:2] == (2, 64)
        assert item.batch.slot_to_example.shape == (2, 8)
        assert item.targets["label"].shape == (len(item.keys),) == (item.batch.num_examples,)
        seen += item.keys
    assert sorted(seen, key=int) == [str(i) for i in range(48)]
    assert loader.epoch == 1


def test_targets_follow_output_rows():
    loader = make_loader()
    source = loader.source
    for item in loader:
        assert item.targets["label"].tolist() == [source.label(int(k)) for k in item.keys]
    # A task's own targets (here: label and caption) travel the same way.
    loader = make_loader(targets=lambda item: {"label": item["label"], "caption": item["caption"]})
    for item in loader:
        assert item.targets["caption"] == [source.caption(int(k)) for k in item.keys]


@pytest.mark.parametrize("workers", [2, 3])
def test_deterministic_and_independent_of_worker_count(workers):
    reference = [signature(item) for item in make_loader(workers=0)]
    assert [signature(item) for item in make_loader(workers=workers)] == reference
    assert [signature(item) for item in make_loader(seed=8)] != reference


def test_epochs_reshuffle():
    loader = make_loader()
    first = [item.keys for item in loader]
    second = [item.keys for item in loader]
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))


def epochs(loader, count):
    for _ in range(count):
        yield from loader


@pytest.mark.parametrize("workers, cut", [(0, 3), (2, 2), (3, 4)])
def test_resume_mid_epoch_reproduces_the_rest_and_the_next_epoch(workers, cut):
    reference = [signature(item) for item in epochs(make_loader(workers=workers), 2)]
    loader = make_loader(workers=workers)
    stream = iter(loader)
    for _ in range(cut):
        next(stream)
    state = loader.state_dict()
    assert state["buffer"], "the saved state holds examples waiting in the buffer"
    resumed = make_loader(workers=workers)
    resumed.load_state_dict(state)
    assert [signature(item) for item in epochs(resumed, 2)] == reference[cut:]
    with pytest.raises(ValueError, match="same --workers"):
        make_loader(workers=workers + 2).load_state_dict(state)


def test_ranks_read_disjoint_parts_that_cover_the_epoch():
    keys = [{k for item in make_loader(rank=r, world_size=3) for k in item.keys} for r in range(3)]
    assert set.union(*keys) == {str(i) for i in range(48)} and sum(map(len, keys)) == 48


def test_token_dropping_in_training_only():
    dropper = TokenDropper(ConstantRate(0.5), seed=0)
    kept = sum(item.batch.num_real_tokens for item in make_loader(dropper=dropper))
    full = sum(item.batch.num_real_tokens for item in make_loader())
    assert 0.4 < kept / full < 0.6
    evaluation = make_loader(dropper=TokenDropper(ConstantRate(0.5)), train=False)
    assert sum(item.batch.num_real_tokens for item in evaluation) == sum(
        item.batch.num_real_tokens for item in make_loader(train=False)
    )


def test_drop_schedule_reads_the_progress_of_the_run():
    dropper = TokenDropper(ConstantRate(0.5), seed=0)
    chain = train_chain(Processor(patch_size=16, max_tokens=32), dropper=dropper,
                        schedule=DropSchedule("linear", start=1.0, end=0.0))  # fmt: skip
    loader = make_loader(chain=chain, epochs=2.0)
    first = sum(item.batch.num_real_tokens for item in loader)
    second = sum(item.batch.num_real_tokens for item in loader)
    full = sum(item.batch.num_real_tokens for item in make_loader(chain=train_chain(Processor(patch_size=16, max_tokens=32))))
    assert first < second < full  # rates fall from 0.5 to 0 over the two epochs


def test_sigmoid_drop_schedule_moves_from_start_to_end():
    schedule = DropSchedule("sigmoid", start=1.0, end=0.0)
    values = [schedule(t / 10) for t in range(11)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[5] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="drop schedule"):
        DropSchedule("cosine")


def test_bad_images_are_skipped_and_counted():
    class Broken(SyntheticShapes):
        def item(self, index):
            if index % 5 == 0:
                raise ValueError(f"cannot decode image broken-{index}.png")
            return super().item(index)

    source = Broken(num_images=20, seed=0, max_side=96)
    loader = make_loader(source=source)
    with pytest.warns(UserWarning, match="skipping synthetic"):
        seen = [k for item in loader for k in item.keys]
    assert sorted(seen, key=int) == [str(i) for i in range(20) if i % 5]
    assert sum(loader.skipped.values()) == 4
    with pytest.raises(ValueError, match="broken-0"):
        list(make_loader(source=source, fail_fast=True))


def test_skips_are_counted_by_cause_and_a_file_gone_bad_before_a_resume_is_skipped(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(6):
            Image.new("RGB", (32 + i, 40), (i * 20, 0, 0)).save(tmp_path / name / f"{i}.png")
        (tmp_path / name / "empty.png").write_bytes(b"")
    (tmp_path / "a" / "junk.png").write_text("junk")
    source = ImageFolder(tmp_path)
    make = lambda: make_loader(source=source, chain=train_chain(Processor(patch_size=16, max_tokens=16)),  # noqa: E731
                               packing=PackingConfig(seq_len=16, num_seqs=1, buffer_size=8), seed=1)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = make()
        list(loader)
        # Two empty files are one cause (the names are in the warnings, not in the counts).
        assert dict(loader.skipped) == {"cannot decode image <file>: the file is empty (0 bytes)": 2,
                                        "cannot decode image <file>: not an image format Pillow recognises": 1}  # fmt: skip
        loader = make()
        stream = iter(loader)
        next(stream)
        state = loader.state_dict()
        waiting = {item.key for item in loader._buffer}
        broken = next(k for k in sorted(waiting))
        with open(tmp_path / broken, "wb"):  # emptied between the save and the resume
            pass
        resumed = make()
        resumed.load_state_dict(state)
        seen = [k for batch in resumed for k in batch.keys]
    assert broken not in seen and waiting - {broken} <= set(seen)
    assert sum(resumed.skipped.values()) == 3 + 1, "the epoch's three bad files and the one gone bad"


def test_an_example_longer_than_a_sequence_is_refused_by_name():
    with pytest.raises(ValueError, match="cannot be packed into seq_len=16: raise seq_len"):
        list(make_loader(packing=PackingConfig(seq_len=16, num_seqs=2, max_examples_per_seq=8, buffer_size=4)))
