"""Real multi-process runs with gloo on CPU: DDP gradients, uneven shards, N->M rank resume."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_TRAIN, random_images, run_ranks, tiny_model

from navit import distributed as D
from navit import pack_images
from navit.tasks import get_task
from navit.train import normalised
from navit.data.stream import split_holdout
from navit.synthetic.segmentation import SyntheticSegmentation

TASK = get_task("classify", {"label_smoothing": 0.1}, [str(i) for i in range(7)])
# Rank 0 holds 2 images, rank 1 holds 5: uneven, as packing makes them.
SIZES = [(16, 24), (24, 24), (8, 32), (16, 16), (32, 16), (24, 8), (16, 40)]
SPLIT = 2


def _data():
    images = random_images(SIZES, seed=4)
    labels = torch.arange(len(SIZES)) % 7
    return images, labels


def _ddp_rank_step(rank: int, world: int, out: str) -> None:
    info = D.DistInfo(rank=rank, world_size=world, local_rank=rank)
    model = tiny_model(seed=0).train()
    wrapped = D.wrap_model(model, info, "ddp", torch.device("cpu"))
    images, labels = _data()
    mine = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    batch = pack_images(images[mine], 8, 32)
    step = TASK.loss(wrapped, model, batch, {"label": labels[mine]})
    total = int(D.sum_over_ranks(step.count, info, torch.device("cpu")))  # as the trainer does
    normalised(step, total, world).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"grads": grads, "images": total}, f"{out}/rank{rank}.pt")


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    _ddp_rank_step(rank, world, out)
    # The DDP wrapper must be gone before the group: a Reducer that outlives it drops the last
    # reference to ProcessGroupGloo while holding the GIL, and deadlocks with a gloo worker thread
    # that needs the GIL to free its last finished work (seen as a hang in about 1 run in 10).
    gc.collect()
    D.shutdown()


def test_ddp_gradients_match_single_process_for_uneven_ranks(tmp_path):
    run_ranks(_ddp_worker, 2, (2, str(tmp_path / "init"), str(tmp_path)))
    model = tiny_model(seed=0).train()
    images, labels = _data()
    step = TASK.loss(model, model, pack_images(images, 8, 32), {"label": labels})
    normalised(step, step.count, 1).backward()
    count = step.count
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["images"] == count == len(SIZES)
        for name, param in model.named_parameters():
            torch.testing.assert_close(result["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from navit.cli import main

    out = tmp_path_factory.mktemp("ddp") / "shapes"
    # 45 images: the two ranks' shards pack into different numbers of batches per epoch.
    main(["data", "synth", "--out", str(out), "--num-images", "45"])
    return out


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_trains_on_uneven_shards_and_resumes_on_one_rank(strategy, image_folder, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = ["-m", "navit", "train", "--data", str(image_folder), "--out", str(tmp_path), *TINY_TRAIN,
            "--distributed", strategy]  # fmt: skip
    # 3 epochs' worth of steps, so every rank crosses epoch ends at different steps.
    run([*torchrun, *args, "--name", "two", "--max-steps", "12", "--save-every", "6"])
    run_dir = Path(tmp_path) / "two"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))  # logged once, by rank 0
    meta = json.loads((run_dir / "checkpoints" / "step_00000012" / "meta.json").read_text())
    assert meta["world_size"] == 2 and len(meta["loader"]) == 2

    # The 2-rank checkpoint at step 6 resumes in a single process.
    out = run([sys.executable, "-m", "navit", "train", "--resume", str(run_dir / "checkpoints" / "step_00000006"),
               "--data", str(image_folder), "--out", str(tmp_path), *TINY_TRAIN, "--max-steps", "9"])  # fmt: skip
    assert "resumed from" in out.stdout and "restarts" in out.stdout
    assert (run_dir / "checkpoints" / "step_00000009").exists()


def test_torchrun_trains_and_evaluates_segmentation_under_ddp(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run([*torchrun, "-m", "navit", "train", "--task", "segment", "--data", "synthetic-seg:24", "--out", str(tmp_path),
         *TINY_TRAIN, "--distributed", "ddp", "--name", "seg", "--max-steps", "3"])  # fmt: skip
    report = json.loads((Path(tmp_path) / "seg" / "eval.json").read_text())
    held_out = len(split_holdout(SyntheticSegmentation(24), 0.2, seed=0)[1])
    assert set(report) == {"native", "4", "16"} and report["native"]["examples"] == held_out > 0
    assert 0 < report["native"]["pixel_accuracy"] <= 1



def test_fsdp_ranks_start_from_one_model_and_stop_together_at_a_flop_budget(image_folder, tmp_path):
    # Ranks count different FLOPs (their examples differ): each must stop at the same step, or
    # the first to stop waits in a collective the others never reach. FSDP shards the model
    # every rank built, so all must build the one a single process builds with the same seed.
    still = ["--lr", "1e-30", "--min-lr", "0", "--data", str(image_folder), "--out", str(tmp_path), *TINY_TRAIN]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # After 3 steps rank 0 has counted 84.44 MFLOPs and rank 1 84.33: times two ranks, one is
    # past this budget and the other not; the total over both ranks (168.76 MFLOPs) is past it.
    run([*torchrun, "-m", "navit", "train", *still, "--distributed", "fsdp", "--name", "two",
         "--max-flops", "168700000"], timeout=120)  # fmt: skip
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["train_flops"] >= 168700000
    run([sys.executable, "-m", "navit", "train", *still, "--name", "one", "--max-steps", "1"])
    from navit.inference import load_checkpoint

    two, one = load_checkpoint(tmp_path / "two")[0].state_dict(), load_checkpoint(tmp_path / "one")[0].state_dict()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=0, atol=1e-6, msg=name)


def test_fsdp_refuses_a_model_with_0d_parameters_before_any_work():
    from navit.two_tower import create_image_text_model

    two_ranks = D.DistInfo(rank=0, world_size=2)
    model = create_image_text_model("navit_ti16", text_depth=1, image_overrides=dict(depth=1))
    with pytest.raises(ValueError, match=r"fsdp cannot shard the model's 0-d parameters \['logit_scale'"):
        D.check_wrappable(model, two_ranks, "fsdp")
    D.check_wrappable(model, two_ranks, "ddp")
    D.check_wrappable(tiny_model(), two_ranks, "fsdp")
