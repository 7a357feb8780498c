"""What `scripts/bench.py` prints and writes: ratios, the targets of issue 17, tables, the chart, the setup."""
from __future__ import annotations

import os
import platform
import sys

from bench_models import ALPHA, GRALORA_K, PROJECTIONS, R, SINGLORA_STEP

ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
mb = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
pct = lambda x: f"{100 * x:+.1f}%"  # noqa: E731


def spread(times: dict, ours: str, ref: str) -> tuple[float, float]:
    """Quartiles of ours / ref taken round by round (each round runs both back to back): the run's noise."""
    paired = sorted(a / b for a, b in zip(times[ours], times[ref]))
    return paired[len(paired) // 4], paired[(3 * len(paired)) // 4]


def overheads(med: dict, floor_s: float, ours: str, ref: str, times: dict) -> dict:
    """ours / ref (and its round-by-round quartiles), each over the base, each overhead in memory floors."""
    base = med["base"]
    return {"ours_over_ref": med[ours] / med[ref], "ours_over_ref_q": spread(times, ours, ref),
            "ours_overhead": med[ours] / base - 1,
            "ref_overhead": med[ref] / base - 1, "ours_over_mem_floor": (med[ours] - base) / floor_s,
            "ref_over_mem_floor": (med[ref] - base) / floor_s}


def ratios(row: dict) -> dict:
    """Ratios of one variant's (or one sweep width's) medians, eager and compiled."""
    med, floor = row["median"], row["floors"]["memory_s"]
    hooked, ref_hooked = ("hooked", "ref_hooked") if "hooked" in med["inference"] else ("ours", "ref")
    out = {"flop_floor": row["floors"]["flop"],
           "train": overheads(med["train"], floor["train"], "ours", "ref", row["train_s"]),
           "inference": overheads(med["inference"], floor["inference"], hooked, ref_hooked, row["inference_s"])}
    if "merged" in med["inference"]:
        out["merged_over_base"] = med["inference"]["merged"] / med["inference"]["base"]
    if "peak_bytes" in row:
        out["peak_ours_over_ref"] = row["peak_bytes"]["ours"] / max(row["peak_bytes"]["ref"], 1)
    if "compiled" in row:
        c = row["compiled"]
        out["compiled"] = {kind: overheads(c["median"][kind], floor[kind], "ours", "ref", c[f"{kind}_s"])
                           for kind in ("train", "inference")}
    return out


def targets(results: dict) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for the goals of issue 17 (and the inference goals of issue 6)."""
    out = []
    for name, r in results.items():
        q = r["ratios"]
        limit = 0.60 if name == "singlora" else 0.90
        got = q["train"]["ours_over_ref"]
        out.append((f"{name} train ours/ref <= {limit}", got <= limit, ratio(q["train"])))
        for kind, c in q.get("compiled", {}).items():
            out.append((f"{name} compiled {kind} ours <= ref", c["ours_over_ref"] <= 1, ratio(c)))
        p = r["peak_bytes"]
        out.append((f"{name} peak memory ours <= ref", p["ours"] <= p["ref"], f"{mb(p['ours'])} vs {mb(p['ref'])} MB"))
        out.append((f"{name} merged/base <= 1.02", q["merged_over_base"] <= 1.02, f"{q['merged_over_base']:.3f}"))
        i = q["inference"]
        out.append((f"{name} hooked overhead <= reference's", i["ours_overhead"] <= i["ref_overhead"],
                    f"{pct(i['ours_overhead'])} vs {pct(i['ref_overhead'])}"))
        if name == "lora":
            t = q["train"]
            out.append(("lora train overhead <= 1.5x memory floor", t["ours_over_mem_floor"] <= 1.5,
                        f"{t['ours_over_mem_floor']:.2f}x ({pct(t['ours_overhead'])})"))
    return out


def ratio(q: dict) -> str:
    """ours / ref with the quartiles of its round-by-round values."""
    lo, hi = q["ours_over_ref_q"]
    return f"{q['ours_over_ref']:.3f} ({lo:.2f}–{hi:.2f})"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def train_table(results: dict) -> str:
    rows = [["variant", "base ms", "ours ms", "ref ms", "ours/ref (q1–q3)", "ours/base-1", "ref/base-1", "FLOP floor",
             "mem floor ms", "ours/mem floor", "ref/mem floor", "peak MB base/ours/ref"]]
    for name, r in results.items():
        t, q, p = r["median"]["train"], r["ratios"]["train"], r["peak_bytes"]
        rows.append([f"{name} ({r['reference']})", ms(t["base"]), ms(t["ours"]), ms(t["ref"]),
                     ratio(q), pct(q["ours_overhead"]), pct(q["ref_overhead"]),
                     pct(r["ratios"]["flop_floor"]), ms(r["floors"]["memory_s"]["train"]),
                     f"{q['ours_over_mem_floor']:.2f}x", f"{q['ref_over_mem_floor']:.2f}x",
                     f"{mb(p['base'])} / {mb(p['ours'])} / {mb(p['ref'])}"])
    return table(rows)


def inference_table(results: dict) -> str:
    rows = [["variant", "base ms", "hooked ms", "merged ms", "ref hooked ms", "merged/base", "ours/base-1",
             "ref/base-1", "ours/mem floor", "attach ms ours/ref"]]
    for name, r in results.items():
        i, q, at = r["median"]["inference"], r["ratios"], r["median"]["attach"]
        attach = (f"{ms(at['ours'])} / {ms(at['ref'])}" if "ours" in at else
                  f"{ms(at['ours_niter4'])} / {ms(at['ref_pissa_niter_4'])} (niter 4)")
        rows.append([name, ms(i["base"]), ms(i["hooked"]), ms(i["merged"]), ms(i["ref_hooked"]),
                     f"{q['merged_over_base']:.3f}", pct(q["inference"]["ours_overhead"]),
                     pct(q["inference"]["ref_overhead"]), f"{q['inference']['ours_over_mem_floor']:.2f}x", attach])
    return table(rows)


def compiled_table(results: dict) -> str:
    rows = [["variant", "kind", "base ms", "ours ms", "ref ms", "ours/ref (q1–q3)", "ours/base-1", "ref/base-1",
             "ours/mem floor"]]
    for name, r in results.items():
        for kind in ("train", "inference"):
            m, q = r["compiled"]["median"][kind], r["ratios"]["compiled"][kind]
            rows.append([name, kind, ms(m["base"]), ms(m["ours"]), ms(m["ref"]), ratio(q),
                         pct(q["ours_overhead"]), pct(q["ref_overhead"]), f"{q['ours_over_mem_floor']:.2f}x"])
    return table(rows)


def sweep_table(widths: dict) -> str:
    rows = [["hidden", "base ms", "ours ms", "ref ms", "ours/ref (q1–q3)", "ours/base-1", "FLOP floor",
             "mem floor ms", "ours/mem floor", "ref/mem floor", "infer ours/base-1", "infer ours/mem floor"]]
    for width, r in widths.items():
        t, q, i = r["median"]["train"], r["ratios"]["train"], r["ratios"]["inference"]
        rows.append([width, ms(t["base"]), ms(t["ours"]), ms(t["ref"]), ratio(q),
                     pct(q["ours_overhead"]), pct(r["ratios"]["flop_floor"]), ms(r["floors"]["memory_s"]["train"]),
                     f"{q['ours_over_mem_floor']:.2f}x", f"{q['ref_over_mem_floor']:.2f}x", pct(i["ours_overhead"]),
                     f"{i['ours_over_mem_floor']:.2f}x"])
    return table(rows)


def hot_path_table(results: dict) -> str:
    rows = [["variant", "model", "fwd kernels", "bwd kernels", "autograd nodes", "fwd MB alloc", "bwd MB alloc",
             "floor MB (layer, train)"]]
    for name, r in results.items():
        h = r["hot_path"]
        for kind in ("base", "ours", "ref"):
            k = h[kind]
            rows.append([name, kind, str(k["forward_kernels"]), str(k["backward_kernels"]), str(k["autograd_nodes"]),
                         mb(k["forward_bytes"]), mb(k["backward_bytes"]), mb(h["floor_bytes"])])
    return table(rows)


def layout_table(layouts: list[dict], bytes_per_s: float) -> str:
    rows = [["d", "r", "rank side left us", "rank side right us", "left/right", "GB/s (faster)", "copy GB/s"]]
    for x in layouts:
        left, right = x["rank_left_s"], x["rank_right_s"]
        rows.append([str(x["d"]), str(x["r"]), f"{1e6 * left:.0f}", f"{1e6 * right:.0f}", f"{left / right:.2f}",
                     f"{x['bytes_read'] / min(left, right) / 1e9:.1f}", f"{bytes_per_s / 1e9:.1f}"])
    return table(rows)


def report(results: dict, widths: dict, info: dict, layouts: list[dict]) -> str:
    parts = [f"Memory bandwidth (large copy, this process): {info['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s", "",
             "Train step (forward + backward + AdamW), eager, medians:", train_table(results), "",
             "Inference (no-grad forward), eager, medians; attach time:", inference_table(results)]
    if all("compiled" in r for r in results.values()):
        parts += ["", "Compiled (torch.compile, compiled once before timing), medians:", compiled_table(results)]
    if widths:
        parts += ["", "LoRA width sweep (fixed token count), train step, medians:", sweep_table(widths)]
    parts += ["", "Hot path of one layer (mlp.up_proj of block 0; counts, not times):", hot_path_table(results)]
    parts += ["", f"Low-rank product M Xᵀ, X ({layouts[0]['tokens']} tokens, d), M (r, d): both layouts, medians "
              f"(lora_lite.low_rank.RANK_LEFT):", layout_table(layouts, info["bandwidth_bytes_per_s"])]
    if "pissa" in results:
        at = results["pissa"]["median"]["attach"]
        parts += ["", "PiSSA attach: " + ", ".join(f"{k} {ms(v)} ms" for k, v in at.items())]
    parts += ["", "Targets:"] + [f"  [{'x' if ok else ' '}] {what}: {got}" for what, ok, got in targets(results)]
    return "\n".join(parts)


def chart(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    panels = [("train", [("base", "frozen base"), ("ours", "lora-lite"), ("ref", "reference")],
               "train step (ms, median)"),
              ("inference", [("base", "base"), ("merged", "lora-lite merged"), ("hooked", "lora-lite hooked"),
                             ("ref_hooked", "reference hooked")], "inference forward (ms, median)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 4.2))
    for ax, (kind, series, heading) in zip(axes, panels):
        width = 0.8 / len(series)
        for j, (key, label) in enumerate(series):
            values = [1e3 * results[n]["median"][kind][key] for n in names]
            ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(names))], values, width, label=label)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(heading)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine(a) -> dict:
    import importlib.metadata as md

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": a.threads, "gpu": gpu, "python": platform.python_version(),
            "load_avg_start": os.getloadavg(),
            **{pkg: md.version(pkg) for pkg in ("torch", "transformers", "peft", "peft-singlora", "lora-lite")}}


def setup(a, argv) -> dict:
    keys = ("hidden", "layers", "seq", "batch", "vocab", "device", "dtype", "threads", "repeats", "compile",
            "compile_backend", "compile_repeats", "widths", "sweep_layers", "sweep_tokens", "sweep_repeats", "quick")
    out = {k: getattr(a, k) for k in keys}
    out.update(r=R, alpha=ALPHA, gralora_k=GRALORA_K, singlora_step=SINGLORA_STEP, targets=PROJECTIONS,
               memory="peak tensor bytes live during one train step (CPU: profiler memory events; "
                      "CUDA: max_memory_allocated)",
               command="python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv))
    return out


def title(a, info: dict) -> str:
    where = info["gpu"] or f"{a.threads} CPU threads"
    return (f"Qwen3 (random weights) hidden {a.hidden}, {a.layers} layers, batch {a.batch} x seq {a.seq}, {a.dtype}, "
            f"{where}, r={R}, all 7 projections; torch {info['torch']}, peft {info['peft']}")
