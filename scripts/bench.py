"""Speed and memory of every variant against the frozen base model and the reference implementation.

    just bench                      # defaults: Qwen3 hidden 512, 4 layers, seq 256, batch 4, fp32, 2 threads
    just bench --quick              # tiny sizes, a few seconds: checks the script, measures nothing useful
    just bench --variants lora pissa --repeats 5

A Qwen3 built from `transformers.Qwen3Config` with random weights; every linear projection of every
block is targeted (q, k, v, o, gate, up, down), r=8, alpha=16. For each variant, the three models run
INTERLEAVED (base, ours, reference, base, ours, reference, ...) so drift in machine load hits all three
alike; every figure is a median.

- train step: forward, cross-entropy, backward, AdamW step on the trainable tensors. The frozen base
  has nothing to train, so its input embeddings are made to require grad: it pays for the same
  backward pass through the activations that an adapter in the first block forces, and no optimizer.
- peak memory: torch profiler memory events (profile_memory=True) over one train step, the peak of
  (bytes allocated - bytes freed) by tensors during the step. The same for all three models.
- inference: a no-grad forward of the base, ours hooked, ours merged (`ll.merge`), reference hooked.
- attach: `ll.attach` vs `peft.get_peft_model` on a fresh copy of the base (the copy is not timed);
  for PiSSA also the full SVD (niter=None) vs PEFT `pissa` and randomized (niter=4) vs `pissa_niter_4`.
- FLOP floor: adapter matmul FLOPs / base FLOPs per token, forward only (the backward multiplies both
  by about the same factor), counted from the shapes; printed beside the measured ours/base - 1.

References: PEFT 0.21 (LoRA, PiSSA, DeLoRA, GraLoRA), peft-singlora 0.2.0 (SingLoRA).
Writes <out>/bench.json and <out>/bench.png; progress goes to stderr, tables to stdout.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lora_lite as ll  # noqa: E402

R, ALPHA, GRALORA_K, SINGLORA_STEP = 8, 16, 2, 500  # SingLoRA mid-ramp (u = 0.5): no variant may skip work
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REFERENCE = {"lora": "peft", "pissa": "peft", "delora": "peft", "gralora": "peft", "singlora": "peft-singlora"}
KINDS = ("base", "ours", "ref")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=None, help="default: every variant with a reference")
    p.add_argument("--repeats", type=int, default=21, help="timed runs of each model per measurement")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats: a few seconds")
    p.add_argument("--out", default="results/bench")
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.layers, a.seq, a.batch, a.vocab, a.repeats = 64, 2, 32, 2, 256, 2
    a.variants = a.variants or [v for v in REFERENCE if v in ll.REGISTRY]
    unknown = [v for v in a.variants if v not in ll.REGISTRY]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; registered: {sorted(ll.REGISTRY)}")
    missing = [v for v in a.variants if v not in REFERENCE]
    if missing:
        p.error(f"no reference implementation known for {missing}: add one to REFERENCE and reference()")
    return a


# ---------------------------------------------------------------- models


def build_base(a) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    heads = max(1, a.hidden // 64)
    cfg = Qwen3Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=3 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      head_dim=a.hidden // heads, max_position_embeddings=max(a.seq, 64), tie_word_embeddings=False)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).to(getattr(torch, a.dtype))


def our_config(name: str, a, **opts) -> ll.AdapterConfig:
    cls = ll.REGISTRY[name].config
    fields = cls.__dataclass_fields__
    extra = {"k": GRALORA_K} if "k" in fields else {}
    return cls(r=R, alpha=ALPHA, dtype=getattr(torch, a.dtype), target_roles=(), **extra, **opts)


def ours(name: str, model, a, **opts):
    """lora-lite's `name` attached to `model` itself (pass a copy)."""
    ll.attach(model, our_config(name, a, **opts))
    if name == "singlora":
        ll.set_step(model, SINGLORA_STEP)
    return model


def reference(name: str, model, pissa_init: str = "pissa_niter_4"):
    """The reference implementation of `name` on `model` itself (pass a copy): one place for every reference."""
    from peft import get_peft_model

    if name == "singlora":
        # SingLoRAConfig registers its layer on this config only (setup_singlora() would patch LoraConfig globally)
        from peft_singlora import SingLoRAConfig, update_singlora_global_step

        peft_model = get_peft_model(model, SingLoRAConfig(r=R, lora_alpha=ALPHA, target_modules=PROJECTIONS))
        update_singlora_global_step(peft_model, SINGLORA_STEP)
        return peft_model
    from peft import DeloraConfig, GraloraConfig, LoraConfig

    cfg = {
        "lora": lambda: LoraConfig(r=R, lora_alpha=ALPHA, target_modules=PROJECTIONS),
        "pissa": lambda: LoraConfig(r=R, lora_alpha=ALPHA, target_modules=PROJECTIONS, init_lora_weights=pissa_init),
        "delora": lambda: DeloraConfig(r=R, delora_lambda=15, target_modules=PROJECTIONS),
        "gralora": lambda: GraloraConfig(r=R, alpha=ALPHA, gralora_k=GRALORA_K, hybrid_r=0,
                                         target_modules=PROJECTIONS),
    }[name]()
    return get_peft_model(model, cfg)


def frozen_base(base):
    """A frozen copy whose embedding output requires grad, so its backward runs through every block."""
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: out.requires_grad_(True))
    return model


# ---------------------------------------------------------------- measurements


def train_step(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()

    def step():
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def infer(model, ids):
    model.eval()

    def run():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    return run


def interleaved(fns: dict, repeats: int, label: str) -> dict[str, list[float]]:
    """Seconds per call of each fn, run round-robin after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for i in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
        log(f"{label} {i + 1}/{repeats}: " + "  ".join(f"{k} {1e3 * v[-1]:.1f}ms" for k, v in times.items()))
    return times


def peak_bytes(fn) -> int:
    """Peak of tensor bytes allocated minus freed during fn(), from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def attach_times(name: str, base, a, repeats: int) -> dict[str, list[float]]:
    """ours / ref attach (copies made outside the clock), interleaved; PiSSA also both SVD flavours."""
    cases = {"ours": lambda m: ours(name, m, a), "ref": lambda m: reference(name, m)}
    if name == "pissa":
        cases = {"ours_svd": lambda m: ours(name, m, a, niter=None),
                 "ours_niter4": lambda m: ours(name, m, a, niter=4),
                 "ref_pissa": lambda m: reference(name, m, "pissa"),
                 "ref_pissa_niter_4": lambda m: reference(name, m, "pissa_niter_4")}
    times = {k: [] for k in cases}
    for _ in range(repeats):
        for k, attach in cases.items():
            model = copy.deepcopy(base)
            t = time.perf_counter()
            attach(model)
            times[k].append(time.perf_counter() - t)
    log(f"{name} attach: " + "  ".join(f"{k} {1e3 * statistics.median(v):.1f}ms" for k, v in times.items()))
    return times


# ---------------------------------------------------------------- FLOPs


def adapter_flops(name: str, d_in: int, d_out: int) -> int:
    """Matmul FLOPs per token of one adapted layer's forward."""
    low_rank = 2 * R * (d_in + d_out)  # x -> (r) -> (d_out); GraLoRA's k blocks sum to the same
    return 2 * low_rank if name == "pissa" else low_rank  # PiSSA runs B A x and the frozen B0 A0 x


def flop_floor(name: str, base, a) -> float:
    """Adapter / base forward FLOPs per token for the whole model (linears, causal attention, lm_head)."""
    cfg = base.config
    adapter = base_flops = 0
    for n, m in base.named_modules():
        if isinstance(m, torch.nn.Linear):
            base_flops += 2 * m.in_features * m.out_features
            if n.rsplit(".", 1)[-1] in PROJECTIONS:
                adapter += adapter_flops(name, m.in_features, m.out_features)
    # q k^T and att v over on average seq/2 keys (causal), every head
    base_flops += cfg.num_hidden_layers * 2 * 2 * (a.seq // 2) * cfg.num_attention_heads * cfg.head_dim
    return adapter / base_flops


# ---------------------------------------------------------------- one variant


def bench_variant(name: str, base, ids, a) -> dict:
    log(f"{name}: building ours and {REFERENCE[name]}")
    models = {"base": frozen_base(base), "ours": ours(name, copy.deepcopy(base), a),
              "ref": reference(name, copy.deepcopy(base))}
    steps = {k: train_step(m, ids) for k, m in models.items()}
    train = interleaved(steps, a.repeats, f"{name} train")
    peak = {k: peak_bytes(steps[k]) for k in KINDS}
    del steps  # the optimizers' state
    merged = copy.deepcopy(models["ours"])
    ll.merge(merged)
    runs = {"base": infer(models["base"], ids), "hooked": infer(models["ours"], ids),
            "merged": infer(merged, ids), "ref_hooked": infer(models["ref"], ids)}
    inference = interleaved(runs, a.repeats, f"{name} inference")
    attach = attach_times(name, base, a, 1 if a.quick else 3)
    med = {k: statistics.median(v) for k, v in train.items()}
    inf = {k: statistics.median(v) for k, v in inference.items()}
    return {
        "reference": REFERENCE[name],
        "train_s": train, "inference_s": inference, "attach_s": attach, "peak_bytes": peak,
        "median": {"train": med, "inference": inf, "attach": {k: statistics.median(v) for k, v in attach.items()}},
        "ratios": {
            "train_ours_over_ref": med["ours"] / med["ref"],
            "train_ours_overhead": med["ours"] / med["base"] - 1,
            "train_ref_overhead": med["ref"] / med["base"] - 1,
            "flop_floor": flop_floor(name, base, a),
            "merged_over_base": inf["merged"] / inf["base"],
            "hooked_overhead": inf["hooked"] / inf["base"] - 1,
            "ref_hooked_overhead": inf["ref_hooked"] / inf["base"] - 1,
            "peak_ours_over_ref": peak["ours"] / max(peak["ref"], 1),
        },
    }


# ---------------------------------------------------------------- report


def targets(results: dict) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for the goals of issue 6."""
    out = []
    for name, r in results.items():
        q = r["ratios"]
        limit = 0.55 if name == "singlora" else 0.95
        out.append((f"{name} train ours/ref <= {limit}", q["train_ours_over_ref"] <= limit,
                    f"{q['train_ours_over_ref']:.3f}"))
        out.append((f"{name} merged/base <= 1.02", q["merged_over_base"] <= 1.02, f"{q['merged_over_base']:.3f}"))
        out.append((f"{name} hooked overhead <= reference's", q["hooked_overhead"] <= q["ref_hooked_overhead"],
                    f"{100 * q['hooked_overhead']:+.1f}% vs {100 * q['ref_hooked_overhead']:+.1f}%"))
        if name == "lora":
            out.append(("lora train overhead <= 2x FLOP floor", q["train_ours_overhead"] <= 2 * q["flop_floor"],
                        f"{100 * q['train_ours_overhead']:+.1f}% vs 2 x {100 * q['flop_floor']:.1f}%"))
        if name == "pissa":
            m = r["median"]["attach"]
            out.append(("pissa attach niter=4 <= PEFT pissa_niter_4", m["ours_niter4"] <= m["ref_pissa_niter_4"],
                        f"{1e3 * m['ours_niter4']:.0f}ms vs {1e3 * m['ref_pissa_niter_4']:.0f}ms"))
    return out


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def report(results: dict) -> str:
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    mb = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    pct = lambda x: f"{100 * x:+.1f}%"  # noqa: E731
    train = [["variant", "base ms", "ours ms", "ref ms", "ours/ref", "ours/base-1", "FLOP floor", "ref/base-1",
              "peak MB base/ours/ref"]]
    infer_rows = [["variant", "base ms", "hooked ms", "merged ms", "ref hooked ms", "merged/base",
                   "hooked overhead ours", "hooked overhead ref", "attach ms ours/ref"]]
    for name, r in results.items():
        t, i, q, p, at = (r["median"]["train"], r["median"]["inference"], r["ratios"], r["peak_bytes"],
                          r["median"]["attach"])
        train.append([f"{name} ({r['reference']})", ms(t["base"]), ms(t["ours"]), ms(t["ref"]),
                      f"{q['train_ours_over_ref']:.3f}", pct(q["train_ours_overhead"]), pct(q["flop_floor"]),
                      pct(q["train_ref_overhead"]), f"{mb(p['base'])} / {mb(p['ours'])} / {mb(p['ref'])}"])
        attach = (f"{ms(at['ours'])} / {ms(at['ref'])}" if "ours" in at else
                  f"{ms(at['ours_niter4'])} / {ms(at['ref_pissa_niter_4'])} (niter 4)")
        infer_rows.append([name, ms(i["base"]), ms(i["hooked"]), ms(i["merged"]), ms(i["ref_hooked"]),
                           f"{q['merged_over_base']:.3f}", pct(q["hooked_overhead"]), pct(q["ref_hooked_overhead"]),
                           attach])
    parts = ["Train step (forward + backward + AdamW), medians:", table(train), "",
             "Inference (no-grad forward), medians; attach time:", table(infer_rows)]
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
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    panels = [("train", [("base", "frozen base"), ("ours", "lora-lite"), ("ref", "reference")],
               "train step (ms, median)"),
              ("inference", [("base", "base"), ("merged", "lora-lite merged"), ("hooked", "lora-lite hooked"),
                             ("ref_hooked", "reference hooked")], "inference forward (ms, median)")]
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

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": a.threads, "python": platform.python_version(),
            "load_avg_start": os.getloadavg(),
            **{pkg: md.version(pkg) for pkg in ("torch", "transformers", "peft", "peft-singlora", "lora-lite")}}


def main(argv=None) -> dict:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    info = machine(a)
    log(f"Qwen3 hidden={a.hidden} layers={a.layers} seq={a.seq} batch={a.batch} {a.dtype} threads={a.threads}; "
        f"variants {a.variants}; load avg {info['load_avg_start'][0]:.2f}")
    base = build_base(a)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    results = {name: bench_variant(name, base, ids, a) for name in a.variants}
    info["load_avg_end"] = os.getloadavg()
    info["wall_s"] = time.perf_counter() - t0
    text = report(results)
    print(text)
    setup = {k: getattr(a, k) for k in ("hidden", "layers", "seq", "batch", "vocab", "dtype", "threads", "repeats",
                                        "quick")}
    setup.update(r=R, alpha=ALPHA, gralora_k=GRALORA_K, singlora_step=SINGLORA_STEP, targets=PROJECTIONS,
                 memory="torch profiler memory events: peak tensor bytes live during one train step",
                 command="python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv))
    payload = {"setup": setup, "machine": info, "results": results,
               "targets": [{"target": w, "met": ok, "measured": g} for w, ok, g in targets(results)]}
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(payload, f, indent=1)
    chart(results, os.path.join(a.out, "bench.png"),
          f"Qwen3 (random weights) hidden {a.hidden}, {a.layers} layers, batch {a.batch} x seq {a.seq}, {a.dtype}, "
          f"{a.threads} threads, r={R}, all 7 projections; torch {info['torch']}, peft {info['peft']}")
    log(f"done in {info['wall_s']:.0f}s: wrote {a.out}/bench.json and {a.out}/bench.png")
    return payload


if __name__ == "__main__":
    main()
