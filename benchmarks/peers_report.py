"""The report of ``peers.py``: its Markdown, section by section, and its plots."""

from __future__ import annotations

from pathlib import Path

from peer_models import WIDTHS
from report import fmt, md_table, pyplot, save_figure


def render_header(res: dict) -> list[str]:
    """The command, machine, model and batch, the implementations and any warnings."""
    a = res["args"]
    dims = WIDTHS[a.get("width", "ti")]
    device = a.get("device", "cpu")
    where = res["machine"].get("gpu", "CPU") if device != "cpu" else "CPU"
    lines = [f"# navit vs public NaViT / NaFlex implementations ({where}, {a.get('precision', 'fp32')})", ""]
    m = res["machine"]
    lines += [
        f"`{' '.join(res['command'])}` — torch {m['torch']}, Python {m['python']}, "
        f"{m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores, torch threads {a['threads']}; "
        f"load average at start {fmt(m['load_average_start'], 2)}; total {res['elapsed_s']:.0f} s.",
        "",
        f"Model: {dims.label} widths (width {dims.width}, {dims.heads} heads, MLP {dims.mlp}), patch 16, "
        f"depth {a['depth']}, {a['num_classes']} classes. "
        f"Batch: {a['num_seqs']} sequences × L={a['seq_len']} (max {a['max_examples_per_seq']} images per "
        f"sequence), first-fit packed; timings: {a['warmup']} warm-up + median of {a['repeats']} (train) / "
        f"{a['infer_repeats']} (infer) interleaved repeats. Ratios are medians of per-repeat paired ratios "
        "(navit and the peer timed within the same repeat) on **real tokens/s**.",
        "",
        "Implementations:",
        "",
    ]
    for key, info in res["impls"].items():
        lines.append(f"- **{key}**: {info['detail'] if info['available'] else 'SKIPPED — ' + info['missing']}")
    lines.append("")
    for w in res.get("warnings", []):
        lines += [f"> {w}", ""]
    return lines


def render_mix_stats(mix: str, st: dict) -> list[str]:
    """A mix's images, tokens, padding and attention work."""
    lines = [f"## Mix `{mix}`", "",
              f"{st['images']} images, {st['real_tokens']} real tokens (mean {st['mean_tokens']:.1f}, "
              f"min {st['min_tokens']}, max {st['max_tokens']} per image; W/H "
              f"{st['aspect_w_over_h_range'][0]:.2f}..{st['aspect_w_over_h_range'][1]:.2f}). Padding: navit "
              f"{100 * st['navit_padding']:.1f}%, timm per-image {100 * st['timm_padding']:.1f}%; ceiling: "
              f"{st['images']} images of {st['ceiling_side']}×{st['ceiling_side']} tokens.", ""]
    w = st["attention_work"]
    lines += ["Attention work (scores per head, relative to the ceiling's equal squares): navit images Σnᵢ² "
              f"{w['sum_n2'] / w['ceiling']:.2f}×, navit buckets ({st['navit_plan']}) "
              + ("—" if w["navit_buckets"] is None else f"{w['navit_buckets'] / w['ceiling']:.2f}×")
              + f", timm per-image padding {w['timm_per_image'] / w['ceiling']:.2f}×, dense B·L² "
              f"{w['dense_B_L2'] / w['ceiling']:.2f}×. Varied sizes alone make Σnᵢ² > N·mean²: that part "
              "of navit's gap to the ceiling is the data, not overhead.", ""]
    return lines


def render_mode(mode: str, r: dict, res: dict) -> list[str]:
    """The training or inference tables of one mix: the rows, the ratios, the noise notes."""
    a = res["args"]
    lines = []
    title = "Training step (fwd + bwd + AdamW)" if mode == "train" else "Inference (no_grad, eval)"
    lines += [f"### {title}", ""]
    rows = []
    for key, s in r["rows"].items():
        rows.append([key, f"{s['median_s'] * 1e3:.0f}", f"{s['min_s'] * 1e3:.0f}",
                     fmt(s["images_per_s"]), fmt(s["real_tokens_per_s"], 0),
                     fmt(s["computed_tokens_per_s"], 0), fmt(s.get("gflop")),
                     "—" if s.get("mfu") is None else f"{100 * s['mfu']:.0f}%",
                     f"{s['spread']:.2f}" + ("*" if s["spread"] > 1.5 else ""), s["note"]])
    lines.append(md_table(["impl", "median ms", "min ms", "images/s", "real tok/s",
                           "computed tok/s", "GFLOP", "MFU", "max/min", "note"], rows, "lrrrrrrrrl"))
    lines.append("")
    if r["ratios"]:
        rows = []
        for other, q in r["ratios"].items():
            tgt = q["target"]
            verdict = "" if tgt is None else ("PASS" if q["median"] >= tgt else "**MISS**")
            if verdict and r.get("noisy"):
                verdict += " (noisy)"
            head = q.get("ceiling_over_peer")
            rows.append([f"navit / {other}", f"{q['median']:.2f}×", f"{q['min']:.2f}–{q['max']:.2f}",
                         f"{q['of_mins']:.2f}×", "—" if head is None else f"{head:.2f}×",
                         "" if tgt is None else f"≥ {tgt}×", verdict])
        for name, q in r.get("diagnostic_ratios", {}).items():
            rows.append([f"_{name}_", f"{q['median']:.2f}×", f"{q['min']:.2f}–{q['max']:.2f}", "", "", "", ""])
        lines.append(md_table(["ratio (real tok/s)", "median", "range", "of mins",
                               "ceiling / peer (bound)", "target", ""], rows, "lrrrrrl"))
        lines.append("")
    lin = r["rows"].get("linear-only")
    if lin and res.get("matmul_peak_gflops"):
        lines += [f"`linear-only` runs its GEMMs at {lin['gemm_gflops']:.0f} GFLOP/s; one large square "
                  f"matmul on this device: {res['matmul_peak_gflops']:.0f} GFLOP/s.", ""]
    extra = []
    if r.get("noisy"):
        lines += [f"**Unreliable table**: other processes used {100 * (r.get('other_cpu_fraction') or 0):.0f}% "
                  f"of the machine during it (best of {r.get('attempts', 1)} attempts)"
                  + ("; OpenMP threads stalled" if r.get("stall_probe", {}).get("ratio", 0) > 0.9
                     and a["threads"] > 1 else "") + ".", ""]
    if r.get("busy_warning"):
        extra.append(r["busy_warning"])
    if r.get("other_cpu_fraction") is not None:
        extra.append(f"other processes used {100 * r['other_cpu_fraction']:.0f}% of the machine "
                     "during this table")
    if extra:
        lines += ["_" + "; ".join(extra) + "_", ""]
    return lines


def render_prep_and_profile(mres: dict) -> list[str]:
    lines = []
    if "prep" in mres:
        lines += ["### Data preparation per batch (loader-side work, not in the step times)", ""]
        rows = [[k, f"{v['median_s'] * 1e3:.2f}", f"{v['min_s'] * 1e3:.2f}"] for k, v in mres["prep"].items()]
        lines += [md_table(["what", "median ms", "min ms"], rows), ""]
    if "profile" in mres:
        lines += [f"### Profile: top ops by self CPU time (ms per step, {mres.get('profile_threads')} threads)", ""]
        for name, p in mres["profile"].items():
            ops = ", ".join(f"`{o['op']}` {o['self_ms_per_step']:.1f} ({100 * o['share']:.0f}%)"
                            for o in p["top_ops"][:8])
            lines.append(f"- **{name}** ({p['total_self_ms_per_step']:.0f} ms): {ops}")
            if p["navit_ranges"]:
                rng = ", ".join(f"`{e['range'][7:]}` {e['total_ms_per_step']:.1f}" for e in p["navit_ranges"][:8])
                lines.append(f"  - navit forward ranges (incl. children): {rng}")
        lines.append("")
    return lines


def render_lsweep(ls: dict, a: dict) -> list[str]:
    lines = []
    keys = list(ls["points"][0]["median_s"]) if ls["points"] else []
    others = [k for k in keys if k != "navit"]
    lines += [f"## Training step vs sequence length L (mix `{ls['mix']}`, {ls['tokens_per_batch']} tokens per "
              "batch, B = tokens / L)", "",
              "The dense-mask implementations pay for B·L² attention scores; navit's buckets pay Σnᵢ², "
              "independent of L. 1 warm-up + median of "
              f"{a['lsweep_repeats']} interleaved repeats.", ""]
    rows = []
    for pt in ls["points"]:
        row = [str(pt["seq_len"]), str(pt["num_seqs"]), str(pt["images"])]
        row += [f"{pt['median_s'][k] * 1e3:.0f}" for k in keys]
        row += [f"{pt['ratios'][o]:.2f}×" for o in others]
        row.append(f"noisy: others {100 * (pt.get('other_cpu_fraction') or 0):.0f}%" if pt.get("noisy") else "")
        rows.append(row)
    lines += [md_table(["L", "B", "images"] + [f"{k} ms" for k in keys] + [f"navit / {o}" for o in others]
                       + [""], rows), ""]
    return lines


def render_loader(ld: dict, a: dict) -> list[str]:
    lines = ["## Data loader: `PackedLoader` on PNG files vs the training step it feeds", "",
              f"{ld['num_files']} SyntheticShapes PNGs (sides 64..512, aspect 1:4..4:1) written in "
              f"{ld['write_s']:.1f} s, read by `ImageFolder`, `Processor(max_tokens=256)`, "
              f"{a['num_seqs']}×{a['seq_len']} batches, buffer {a['loader_buffer']} images. Steady state "
              "excludes the first batch and the end-of-epoch flush.", ""]
    rows = []
    for workers, w in ld["by_workers"].items():
        row = [str(workers), f"{w['first_batch_s']:.2f}", f"{w['steady_batches_per_s']:.2f}",
               fmt(w["steady_images_per_s"]), fmt(w["mean_images_per_batch"]),
               f"{100 * w['mean_padding']:.1f}%"]
        cmp = ld.get("vs_train", {}).get(str(workers)) or ld.get("vs_train", {}).get(workers)
        if cmp:
            row += [f"{cmp['batches_ratio']:.1f}×", f"{cmp['images_ratio']:.1f}×",
                    "PASS" if cmp["images_ratio"] >= 3 else "**MISS**"]
        else:
            row += ["—", "—", ""]
        rows.append(row)
    lines += [md_table(["workers", "first batch s", "batches/s", "images/s", "images/batch", "padding",
                        "batches/s ÷ train steps/s", "images/s ÷ train images/s", "target ≥ 3×"],
                       rows, "rrrrrrrrl"), ""]
    if ld.get("train_ref"):
        t = ld["train_ref"]
        lines += [f"Training reference: navit (auto) on mix `{t['mix']}`: {t['steps_per_s']:.2f} steps/s, "
                  f"{t['images_per_s']:.1f} images/s. On this 2-core VM the loader's workers and the "
                  "training step share the same cores, so the standalone loader rate is an upper bound.", ""]
    return lines


def render_memory(res: dict) -> list[str]:
    lines = []
    pts = [p for p in res["memory"]["points"] if "error" not in p]
    gauge = ("CUDA memory (`max_memory_allocated`)" if res["args"].get("device", "cpu") == "cuda"
             else "RSS (VmHWM)")
    lines += [f"## Memory: peak extra {gauge} of one navit training step vs L", "",
              "Fresh process per point; one sequence of L tokens filled with `native`-mix images; "
              "optimizer state allocated by a first step, then the high-water mark is reset and "
              "one more step runs. `extra` = peak − memory in use before the step.", ""]
    backends = sorted({p["backend"] for p in pts})
    lens = sorted({p["seq_len"] for p in pts})
    by = {(p["seq_len"], p["backend"]): p for p in pts}
    rows = []
    for L in lens:
        row = [str(L), str(by.get((L, backends[0]), {}).get("images", ""))]
        for b in backends:
            p = by.get((L, b))
            row += ["—", "—", "—"] if p is None else [
                f"{p['extra_mb']:.0f}", f"{p['extra_mb'] / L * 1024:.1f}", f"{p['step_s']:.2f}"]
        rows.append(row)
    headers = ["L", "images"]
    for b in backends:
        headers += [f"{b} MB", f"{b} MB/1k tok", f"{b} step s"]
    lines += [md_table(headers, rows), ""]
    slopes = res["memory"].get("slopes", {})
    if slopes:
        lines += ["Log-log slope of extra MB vs L (1 = linear, 2 = quadratic), over L ≥ 1024: "
                  + ", ".join(f"{b} {s:.2f}" for b, s in slopes.items() if s is not None), ""]
    return lines


def render_markdown(res: dict) -> str:
    lines = render_header(res)
    for mix, mres in res["mixes"].items():
        lines += render_mix_stats(mix, mres["stats"])
        for mode in ("train", "infer"):
            if mode in mres:
                lines += render_mode(mode, mres[mode], res)
        lines += render_prep_and_profile(mres)
    if "lsweep" in res:
        lines += render_lsweep(res["lsweep"], res["args"])
    if "loader" in res:
        lines += render_loader(res["loader"], res["args"])
    if "memory" in res:
        lines += render_memory(res)
    return "\n".join(lines)


def plot_mixes(res: dict, plt, out_dir: Path) -> list[str]:
    """Real tokens/s of every implementation, a bar chart per mix and mode."""
    import matplotlib

    mixes = [m for m in res["mixes"] if any(k in res["mixes"][m] for k in ("train", "infer"))]
    if not mixes:
        return []
    modes = [mode for mode in ("train", "infer") if any(mode in res["mixes"][m] for m in mixes)]
    fig, axes = plt.subplots(len(modes), len(mixes), figsize=(5.5 * len(mixes), 3.8 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, mix in enumerate(mixes):
            ax = axes[i][j]
            r = res["mixes"][mix].get(mode)
            if not r:
                ax.axis("off")
                continue
            keys = list(r["rows"])
            vals = [r["rows"][k]["real_tokens_per_s"] for k in keys]
            colors = ["tab:blue" if k.startswith("navit") else "tab:gray" if k in ("ceiling", "linear-only")
                      else "tab:orange" for k in keys]  # fmt: skip
            ax.barh(keys, vals, color=colors)
            ax.invert_yaxis()
            ax.set_xlabel("real tokens / s (median)")
            ax.locator_params(axis="x", nbins=5)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0"))
            ax.set_xlim(0, max(vals) * 1.18)
            ax.set_title(f"{mode} — mix {mix}")
            for y, v in enumerate(vals):
                ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
    return [save_figure(fig, out_dir / "peers.png", dpi=110).name]


def plot_memory(res: dict, plt, out_dir: Path) -> list[str]:
    """Peak extra memory of a training step against L, log-log, with a linear reference."""
    pts = [p for p in res["memory"]["points"] if "error" not in p]
    if not pts:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for b in sorted({p["backend"] for p in pts}):
        sel = sorted((p["seq_len"], p["extra_mb"]) for p in pts if p["backend"] == b)
        ax.loglog([x for x, _ in sel], [y for _, y in sel], "o-", label=b, base=2)
    xs = sorted({p["seq_len"] for p in pts})
    ref = [p for p in pts if p["seq_len"] == xs[0]]
    if ref:
        y0 = min(p["extra_mb"] for p in ref)
        ax.loglog(xs, [y0 * x / xs[0] for x in xs], "k:", label="linear", base=2)
    ax.set_xlabel("sequence length L (tokens)")
    ax.set_ylabel("peak extra memory during a train step (MB)")
    ax.set_title("navit training-step memory vs L")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    return [save_figure(fig, out_dir / "peers_memory.png", dpi=110).name]


def make_plots(res: dict, out_dir: Path) -> list[str]:
    """The PNGs written (file names), none where matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return []
    return plot_mixes(res, plt, out_dir) + (plot_memory(res, plt, out_dir) if "memory" in res else [])
