"""Smoke runs of the benchmark scripts at toy sizes, so the suite cannot rot between the long runs.

They check that the scripts run end to end and report what they promise (every requested
implementation, ratios, the device and precision they were asked for), not any timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stderr[-3000:]}"


def test_attention_scaling_times_every_cpu_backend(tmp_path):
    out = tmp_path / "attention.json"
    run_script("attention_scaling.py", "--seq-lens", "128", "256", "--repeats", "1", "--warmup", "0",
               "--out", str(out))
    result = json.loads(out.read_text())
    assert set(result["max_abs_diff_vs_dense"]) == {"bucketed"}
    assert result["max_abs_diff_vs_dense"]["bucketed"] < 1e-4
    assert [row["seq_len"] for row in result["results"]] == [128, 256]
    assert all(row["bucketed"]["fwd_bwd_s"] > 0 and row["dense"]["fwd_bwd_s"] > 0 for row in result["results"])
    assert out.with_suffix(".png").exists()


def test_packing_padding_reports_the_peers_layouts(tmp_path):
    out = tmp_path / "padding.json"
    run_script("packing_padding.py", "--num-images", "3000", "--num-seqs", "4", "--warmup-batches", "2",
               "--sweep-multiples", "1.5", "--out", str(out))
    layouts = json.loads(out.read_text())["peer_layouts"]
    assert set(layouts) == {"256", "1024"}
    assert all(0.0 <= v < 1.0 for peer in layouts.values() for v in peer.values())


def test_video_benchmark_reports_packed_padded_loader_and_padding(tmp_path):
    out = tmp_path / "video.json"
    run_script("video.py", "--depth", "1", "--seq-len", "256", "--num-seqs", "2", "--max-tokens", "64",
               "--max-frames", "6", "--repeats", "1", "--warmup", "0", "--loader-clips", "40", "--loader-buffer", "8",
               "--padding-examples", "2000", "--out", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    train = result["train"]
    assert {"navit", "padded"} <= set(train["rows"]) and train["ratios"]["padded"] > 0
    assert train["rows"]["padded"]["computed_tokens"] > train["rows"]["navit"]["computed_tokens"] * 0.9
    assert result["loader"]["batches"] >= 3 and result["loader"]["ratio"] > 0
    assert 0 <= result["padding"]["seq_lens"]["256"]["padding"] < 1


def test_shards_benchmark_reports_every_reader_the_step_rate_and_memory(tmp_path):
    out = tmp_path / "shards.json"
    run_script("shards.py", "--images", "40", "--max-count", "10", "--stream", "300", "--rounds", "1", "--steps", "1",
               "--out", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    readers = result["readers"]
    assert set(readers) == {"folder", "shards (disk)", "shards (http)", "webdataset"}
    assert all(r["samples"] == 40 and r["samples_per_s"] > 0 for r in readers.values())  # every image, once
    assert readers["webdataset"]["batches_per_s"] is None and readers["folder"]["batches_per_s"] > 0
    memory = result["memory_mib"]
    assert memory["samples"] >= 300 and memory["passes"] >= 7 and 0 < memory["end_main"] < 1.2 * memory["start_main"]
    assert result["train_steps_per_s"] > 0 and out.with_suffix(".md").exists()


def test_siglip2_benchmark_checks_agreement_and_times_both(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "siglip2.json"
    run_script("siglip2.py", "--width", "64", "--depth", "1", "--images", "4", "--batch-images", "2",
               "--max-patches", "16", "64", "--seq-len", "128", "--repeats", "1", "--out", str(out))  # fmt: skip
    result = json.loads(out.read_text())
    for row in result["speed"].values():
        assert row["agreement"] < 1e-4 and row["images_per_s"]["navit"] > 0 and row["ratio_model"] > 0
        assert row["tokens"]["real"] <= row["tokens"]["transformers"]
    assert set(result["memory"]["64"]) == {"transformers", "navit"}


def test_peer_layout_rules_count_their_padding(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from packing_padding import next_fit_padding, per_image_padding

    # Next fit opens a sequence for each image here (first fit would put the last beside the first).
    assert next_fit_padding(np.array([500, 600, 500]), 1024) == pytest.approx(1 - 1600 / (3 * 1024))
    assert next_fit_padding(np.array([500, 500, 600]), 1024) == pytest.approx(1 - 1600 / (2 * 1024))
    # Batches [10, 30] and [20, 20] padded to 30 and 20; the incomplete last batch is left out.
    assert per_image_padding(np.array([10, 30, 20, 20, 5]), 2) == pytest.approx(1 - 80 / 100)


def test_flop_count_of_a_navit_step_is_what_the_model_says(monkeypatch):
    """MFU divides by these counts: torch's formulas (with the CPU flash-attention ones the
    benchmarks add) must see every matmul and attention score navit's own ``flops`` counts. The
    images fill their sequences: ``flops`` counts the linear layers on padding too."""
    import torch

    import navit
    from navit.batch import Example
    from navit.patchify import grid_coords

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from bench_common import count_flops

    torch.manual_seed(0)
    model = navit.create_model("navit_ti16", depth=2, num_classes=10)
    examples = [Example(torch.rand(64, 768), grid_coords(8, 8), (8, 8)) for _ in range(8)]
    batch = navit.pack(examples, 256, num_seqs=2, max_examples_per_seq=4).batch
    with torch.no_grad():
        assert count_flops(lambda: model.eval()(batch)) == model.flops(batch)
    # torch counts a flash backward as 2.5 forwards (it recomputes the scores), navit as 2.
    attention_forward = 2 * 2 * 2 * 8 * 64**2 * 192  # layers x (QK^T, PV) x 2 per MAC x sum n^2 x width
    assert count_flops(lambda: model.train()(batch).sum().backward()) == (
        model.flops(batch, training=True) + attention_forward // 2
    )


def test_a_flex_model_is_counted_with_the_attention_it_computes(monkeypatch):
    # FlexAttention compiles itself and cannot run under the counter's dispatch mode.
    import torch
    from conftest import PATCH, random_images, tiny_model, with_backend

    from navit import pack_images

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import peers
    from bench_common import count_flops
    from peers_timing import counted_flops

    args = peers.parse_args(["--device", "cpu"])
    model = tiny_model(attn_backend="flex")
    batch = pack_images(random_images([(16, 24), (8, 8)]), PATCH, 32)
    with torch.no_grad():
        counted = counted_flops(lambda: model(batch), model, args)
        assert counted == count_flops(lambda: with_backend(model, "bucketed")(batch)) > 0
    assert model.config.attn_backend == "flex", "the model is given back as it was"


def test_uniform_mix_fills_each_image_to_the_token_budget(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import peers
    from peers_data import MAX_TOKENS, make_step

    args = peers.parse_args(["--mixes", "uniform", "--num-seqs", "2"])
    step, originals = make_step("uniform", args)
    counts = [t.num_tokens for t in step.tokens]
    assert all(0.9 * MAX_TOKENS <= n <= MAX_TOKENS for n in counts), counts
    # Scaled up as well as down: the originals are often smaller than what they become.
    assert any(o.shape[1] * o.shape[2] < 16 * 16 * n for o, n in zip(originals, counts))
    aspects = {round(p.shape[2] / p.shape[1], 1) for p in step.pixels}
    assert len(aspects) > 2  # real aspect ratios, not squares


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (elsewhere bf16 matmuls are emulated, minutes each)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


PRECISION = "bf16" if cpu_has_bf16() else "fp32"


@pytest.fixture(scope="module")
def gpu_check_smoke(tmp_path_factory):
    """benchmarks/gpu_check.sh end to end on this CPU: every step at toy sizes (in bf16 where the
    CPU has it, as on the GPU; in fp32 on a CPU that only emulates bf16)."""
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--device", "cpu", "--smoke", "--precision", PRECISION,
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    return proc, out


def test_gpu_check_runs_every_step_and_writes_its_tables(gpu_check_smoke):
    proc, out = gpu_check_smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "passed" in (out / "tests.log").read_text()
    assert "torch" in (out / "environment.txt").read_text()
    summary = (out / "SUMMARY.md").read_text()
    for step in ("attention_scaling", "peers_vit_b", "peers_compiled", "video", "siglip2", "segment"):
        assert f"| {step} |" in summary and (out / f"{step}.md").exists(), step
    assert "FAILED" not in summary
    attention = json.loads((out / "attention_scaling.json").read_text())
    assert attention["config"]["dtype"] == PRECISION and [r["seq_len"] for r in attention["results"]] == [128, 256]
    peers = json.loads((out / "peers_vit_b.json").read_text())
    assert peers["args"]["precision"] == PRECISION and peers["args"]["width"] == "s"
    assert "ViT-S" in (out / "peers_vit_b.md").read_text()
    for mode in ("train", "infer"):
        table = peers["mixes"]["uniform"][mode]
        assert set(table["rows"]) == {"navit", "navit-dense", "ceiling-same"}
        assert table["ratios"]["ceiling-same"]["target"] == (0.95 if mode == "train" else None)
        # MFU: counted FLOPs per second over the square-matmul rate, for every row.
        assert all(0 < row["mfu"] < 2 and row["gflop"] > 0 for row in table["rows"].values())
        # The mask-free ViT does its squares' work, navit its real tokens: navit computes fewer FLOPs
        # than dense masking, which scores all B*L^2 pairs (in fp32 on a CPU, auto may switch these
        # toy batches to one dense call, where that is cheaper: then as many).
        navit, dense = table["rows"]["navit"]["gflop"], table["rows"]["navit-dense"]["gflop"]
        assert navit < dense if PRECISION == "bf16" else navit <= dense
    assert [p["seq_len"] for p in peers["lsweep"]["points"]] == [256, 512]
    video = json.loads((out / "video.json").read_text())
    assert video["train"]["ratios"]["padded"] > 0 and "loader" not in video
    siglip2 = json.loads((out / "siglip2.json").read_text())
    assert all(row["agreement"] < (1e-1 if PRECISION == "bf16" else 1e-3) for row in siglip2["speed"].values())
    segment = json.loads((out / "segment.json").read_text())["run"]
    assert set(segment["rows"]) == {"navit", "padded-longest", "padded-fixed"}
    computed = {name: row["computed_tokens"] for name, row in segment["rows"].items()}
    assert computed["navit"] == 2 * 256 <= computed["padded-longest"] <= computed["padded-fixed"]


def test_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2 and "sees no CUDA device" in proc.stderr
    assert not (tmp_path / "tests.log").exists()  # stopped before running anything


def test_a_step_over_its_budget_is_stopped_and_the_next_still_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run_all

    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    writer = tmp_path / "writer.py"
    writer.write_text("import sys\nprint('| table |')\n")
    monkeypatch.setattr(run_all, "GPU_SUITE", [("slow", str(sleeper), [], 2, []), ("next", str(writer), [], 30, [])])
    assert run_all.main(["--suite", "gpu", "--out-dir", str(tmp_path / "out")]) == 1
    summary = (tmp_path / "out" / "SUMMARY.md").read_text()
    assert "stopped after its 2 s budget" in summary and "| slow |" in summary
    assert "| next | " in summary and "| table |" in summary


def test_run_all_refuses_an_unknown_step_name(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import run_all

    with pytest.raises(SystemExit) as stopped:
        run_all.main(["--suite", "gpu", "--only", "peers", "--out-dir", str(tmp_path)])  # peers_vit_b in this suite
    assert stopped.value.code == 2 and "--only peers: no such step in suite gpu" in capsys.readouterr().err


def test_flop_count_sees_the_matmuls_of_torch_transformer_fast_path(monkeypatch):
    """The plain ViT ceiling runs nn.TransformerEncoder, whose inference fast path is one fused op."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from bench_common import count_flops
    from peer_models import WIDTHS, PlainViT

    dims, images, tokens, depth = WIDTHS["s"], 4, 81, 2
    model = PlainViT(10, depth, dims, tokens).eval()
    patches = torch.rand(images, tokens, 16 * 16 * 3)
    n = images * tokens
    layer = n * (4 * dims.width**2 + 2 * dims.width * dims.mlp) + 2 * images * tokens**2 * dims.width
    expected = 2 * (n * 16 * 16 * 3 * dims.width + depth * layer + images * dims.width * 10)
    with torch.no_grad():
        assert count_flops(lambda: model(patches)) == expected


def test_before_after_rates_leave_out_the_warm_up_and_the_end_of_epoch_flush(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from before_after import loader_rate, train_rate

    # Batches of 10 examples, one a second, then two in quick succession from the buffer of 20
    # left when the files ran out: the flush and the first batch stay out of the rate.
    probe = {"start": 0.0, "stamps": [1.0, 2.0, 3.0, 4.0, 4.1, 4.2], "counts": [10] * 6, "navit": "navit"}
    rate = loader_rate(probe, buffer=20)
    assert rate["batches"] == 3 and rate["first_batch_s"] == 1.0
    assert rate["batches_per_s"] == pytest.approx(1.0) and rate["examples_per_s"] == pytest.approx(10.0)
    assert "error" in loader_rate({**probe, "counts": [30] * 6}, buffer=100)  # too few before the flush
    # Windows of 10 steps: the first (warm-up) is left out; the others take 2 s and 1 s.
    records = [{"examples_per_s": 1.0, "examples_per_batch": 1.0}, {"examples_per_s": 20.0, "examples_per_batch": 4.0},
               {"examples_per_s": 40.0, "examples_per_batch": 4.0}]  # fmt: skip
    rate = train_rate(records, log_every=10)
    assert rate["windows"] == 2
    assert rate["examples_per_s"] == pytest.approx(80 / 3) and rate["steps_per_s"] == pytest.approx(20 / 3)


def test_dense_switch_times_every_variant_in_both_layouts(tmp_path):
    out = tmp_path / "switch.json"
    run_script("dense_switch.py", "--mixes", "small", "--modes", "infer", "train", "--images", "6", "--width", "64",
               "--depth", "1", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["layout"]) for r in rows] == [(m, lay) for m in ("infer", "train") for lay in ("packed", "padded")]
    padded = [r for r in rows if r["layout"] == "padded"]
    assert all(r["rows"][0] == 6 and r["fill"] < 1 for r in padded), "one image per row, padded to the longest"
    assert all(set(r["ms"]) == {"dense", "buckets", "switch"} and r["over_buckets"]["buckets"] == 1.0 for r in rows)
