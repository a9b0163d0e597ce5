"""Smoke runs of the benchmark scripts at toy sizes, so the suite cannot rot between the long runs.

They check that the scripts run end to end and report what they promise (every requested
implementation, ratios, the device and precision they were asked for), not any timing.
"""

from __future__ import annotations

import json
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


def test_peers_runs_train_and_inference_in_bf16(tmp_path):
    out = tmp_path / "peers.json"
    run_script(
        "peers.py", "--quick", "--sections", "train", "infer", "--mixes", "paper",
        "--impls", "navit", "navit-dense", "ceiling", "--depth", "1", "--seq-len", "256",
        "--num-seqs", "2", "--max-examples-per-seq", "8", "--repeats", "1", "--infer-repeats", "1",
        "--warmup", "0", "--precision", "bf16", "--out", str(out),
    )
    result = json.loads(out.read_text())
    assert result["args"]["precision"] == "bf16" and result["args"]["device"] == "cpu"
    for mode in ("train", "infer"):
        table = result["mixes"]["paper"][mode]
        assert set(table["rows"]) == {"navit", "navit-dense", "ceiling"}
        assert set(table["ratios"]) == {"navit-dense", "ceiling"}
        assert all(row["real_tokens_per_s"] > 0 for row in table["rows"].values())
    assert "(CPU, bf16)" in out.with_suffix(".md").read_text()


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


def test_segment_benchmark_times_packed_and_padded_layouts_of_the_same_images(tmp_path):
    out = tmp_path / "segment.json"
    run_script("segment.py", "--depth", "1", "--seq-len", "256", "--num-seqs", "2", "--max-tokens", "128",
               "--repeats", "1", "--warmup", "0", "--out", str(out))  # fmt: skip
    result = json.loads(out.read_text())["run"]
    assert set(result["rows"]) == {"navit", "padded-longest", "padded-fixed"}
    computed = {name: row["computed_tokens"] for name, row in result["rows"].items()}
    assert computed["navit"] == 2 * 256 <= computed["padded-longest"] <= computed["padded-fixed"]
    assert result["real_tokens"] == sum(result["tokens"]) and all(r > 0 for r in result["ratios"].values())
    assert (tmp_path / "segment.md").exists()


def test_peer_layout_rules_count_their_padding(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from packing_padding import next_fit_padding, per_image_padding

    # Next fit opens a sequence for each image here (first fit would put the last beside the first).
    assert next_fit_padding(np.array([500, 600, 500]), 1024) == pytest.approx(1 - 1600 / (3 * 1024))
    assert next_fit_padding(np.array([500, 500, 600]), 1024) == pytest.approx(1 - 1600 / (2 * 1024))
    # Batches [10, 30] and [20, 20] padded to 30 and 20; the incomplete last batch is left out.
    assert per_image_padding(np.array([10, 30, 20, 20, 5]), 2) == pytest.approx(1 - 80 / 100)


def test_linear_only_flops_match_torch_flop_counter(monkeypatch):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from peer_models import LinearLayersOnly, linear_only_flops

    model = LinearLayersOnly(num_classes=10, depth=2)
    patches = torch.rand(64, 16 * 16 * 3)
    with FlopCounterMode(display=False) as train:
        model((patches, 3)).sum().backward()
    with torch.no_grad(), FlopCounterMode(display=False) as infer:
        model((patches, 3))
    # The head works on one pooled row, which the count leaves out.
    assert linear_only_flops(64, 2, train=True) == pytest.approx(train.get_total_flops(), rel=1e-3)
    assert linear_only_flops(64, 2, train=False) == pytest.approx(infer.get_total_flops(), rel=1e-3)
