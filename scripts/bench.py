"""Speed and memory of every variant against the frozen base model and the reference implementation.

    just bench                                   # CPU, fp32, eager and compiled, width sweep (defaults below)
    just bench --device cuda --dtype bfloat16    # the same on a GPU: CUDA events, torch.cuda.max_memory_allocated
    just bench --quick                           # tiny sizes, seconds: checks the script, measures nothing useful
    just bench --variants lora pissa --repeats 5 --no-compile --widths

A Qwen3 built from `transformers.Qwen3Config` with random weights; every linear projection of every block is
targeted (q, k, v, o, gate, up, down), r=8, alpha=16. For each variant the frozen base, ours and the
reference run INTERLEAVED (base, ours, reference, base, ...) so drift in machine load hits all three alike;
every figure is a median. Measurement: bench_measure.py; floors (FLOPs, memory traffic): bench_floors.py;
the hot-path profile: bench_profile.py; tables, targets and chart: bench_report.py; the models:
bench_models.py. Writes <out>/bench.json and <out>/bench.png; progress goes to stderr, tables to stdout.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import bench_floors as floors  # noqa: E402
import bench_layouts  # noqa: E402
import bench_measure as measure  # noqa: E402
import bench_models as models  # noqa: E402
import bench_profile  # noqa: E402
import bench_report as report  # noqa: E402
import lora_lite as ll  # noqa: E402
from bench_measure import log  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--variants", nargs="+", default=None, help="default: every variant with a reference")
    p.add_argument("--repeats", type=int, default=21, help="timed runs of each model per eager measurement")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for the compiled rows")
    p.add_argument("--compile-repeats", type=int, default=11)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled rows")
    p.add_argument("--widths", type=int, nargs="*", default=[256, 512, 1024, 2048],
                   help="LoRA width sweep at a fixed token count (none: skip)")
    p.add_argument("--sweep-layers", type=int, default=1)
    p.add_argument("--sweep-tokens", type=int, default=512, help="tokens per step in the sweep (batch 2 x seq)")
    p.add_argument("--sweep-repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats: a few seconds")
    p.add_argument("--out", default="results/bench")
    a = p.parse_args(argv)
    if a.quick:
        a.hidden, a.layers, a.seq, a.batch, a.vocab, a.repeats = 64, 2, 32, 2, 256, 2
        a.compile_repeats, a.sweep_repeats, a.sweep_tokens = 2, 2, 64
        a.widths = [32, 64] if a.widths else []
    check(p, a)
    return a


def check(p, a) -> None:
    a.variants = a.variants or [v for v in models.REFERENCE if v in ll.REGISTRY]
    unknown = [v for v in a.variants if v not in ll.REGISTRY]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; registered: {sorted(ll.REGISTRY)}")
    missing = [v for v in a.variants if v not in models.REFERENCE]
    if missing:
        p.error(f"no reference implementation known for {missing}: add one to bench_models.REFERENCE")
    kind = torch.device(a.device).type
    if kind not in ("cpu", "cuda"):
        p.error(f"--device {a.device}: the bench times cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: torch {torch.__version__} sees no CUDA device here; run on a GPU machine "
                f"or leave --device at cpu")
    if a.sweep_tokens % 2 or a.sweep_tokens < 4:
        p.error(f"--sweep-tokens {a.sweep_tokens}: give an even count >= 4 (batch 2 x seq)")


def tokens(vocab: int, batch: int, seq: int, device: str) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)


def eager_rows(name: str, trio: dict, base, ids, a, clock) -> dict:
    """Train step, peak memory, inference (hooked and merged) and attach, eager."""
    steps = {k: measure.train_step(m, ids) for k, m in trio.items()}
    train = measure.interleaved(steps, a.repeats, f"{name} train", clock)
    peak = {k: measure.peak_bytes(steps[k], a.device) for k in steps}
    del steps  # the optimizers' state
    merged = copy.deepcopy(trio["ours"])
    ll.merge(merged)
    runs = {"base": measure.infer(trio["base"], ids), "hooked": measure.infer(trio["ours"], ids),
            "merged": measure.infer(merged, ids), "ref_hooked": measure.infer(trio["ref"], ids)}
    inference = measure.interleaved(runs, a.repeats, f"{name} inference", clock)
    attach = attach_times(name, base, a, 1 if a.quick else 3)
    return {"train_s": train, "inference_s": inference, "attach_s": attach, "peak_bytes": peak,
            "median": {"train": measure.medians(train), "inference": measure.medians(inference),
                       "attach": measure.medians(attach)}}


def attach_times(name: str, base, a, repeats: int) -> dict[str, list[float]]:
    """ours / ref attach (copies made outside the clock), interleaved; PiSSA also both SVD flavours."""
    cases = {"ours": lambda m: models.ours(name, m, a.dtype), "ref": lambda m: models.reference(name, m)}
    if name == "pissa":
        cases = {"ours_svd": lambda m: models.ours(name, m, a.dtype, niter=None),
                 "ours_niter4": lambda m: models.ours(name, m, a.dtype, niter=4),
                 "ref_pissa": lambda m: models.reference(name, m, "pissa"),
                 "ref_pissa_niter_4": lambda m: models.reference(name, m, "pissa_niter_4")}
    clock, times = measure.clock_for(a.device), {k: [] for k in cases}
    for _ in range(repeats):
        for k, attach in cases.items():
            model = copy.deepcopy(base)
            times[k].append(clock.time(lambda: attach(model)))
    return times


def compiled_rows(name: str, trio: dict, base_fns: tuple, ids, a, clock) -> dict:
    """Train step and inference of the compiled base (compiled once for all variants), ours and reference."""
    fns = {"base": base_fns, **{k: measure.compiled(trio[k], a.compile_backend, ids, f"{name} {k}")
                                for k in ("ours", "ref")}}
    train = measure.interleaved({k: f[0] for k, f in fns.items()}, a.compile_repeats, f"{name} compiled train", clock)
    inference = measure.interleaved({k: f[1] for k, f in fns.items()}, a.compile_repeats,
                                    f"{name} compiled inference", clock)
    return {"train_s": train, "inference_s": inference,
            "median": {"train": measure.medians(train), "inference": measure.medians(inference)}}


def bench_variant(name: str, base, ids, a, clock, bytes_per_s: float, base_fns) -> dict:
    log(f"{name}: building ours and {models.REFERENCE[name]}")
    trio = models.three(name, base, a.dtype)
    out = {"reference": models.REFERENCE[name], **eager_rows(name, trio, base, ids, a, clock)}
    out["hot_path"] = bench_profile.hot_path(trio, (a.batch, a.seq), a.device)
    if base_fns is not None:
        out["compiled"] = compiled_rows(name, trio, base_fns, ids, a, clock)
    out["floors"] = {"flop": floors.flop_floor(name, base, a.seq),
                     "memory_s": floors.memory_floor(base, a.batch * a.seq, bytes_per_s)}
    out["ratios"] = report.ratios(out)
    return out


def sweep(a, clock, bytes_per_s: float) -> dict:
    """LoRA at each width, a fixed token count: how the overhead over the base and the floors move with width."""
    out = {}
    seq = a.sweep_tokens // 2
    for width in a.widths:
        base = models.build_base(width, a.sweep_layers, seq, a.vocab, a.dtype, a.device)
        ids = tokens(a.vocab, 2, seq, a.device)
        trio = models.three("lora", base, a.dtype)
        train = measure.interleaved({k: measure.train_step(m, ids) for k, m in trio.items()}, a.sweep_repeats,
                                    f"width {width} train", clock)
        inference = measure.interleaved({k: measure.infer(m, ids) for k, m in trio.items()}, a.sweep_repeats,
                                        f"width {width} inference", clock)
        row = {"train_s": train, "inference_s": inference,
               "median": {"train": measure.medians(train), "inference": measure.medians(inference)},
               "floors": {"flop": floors.flop_floor("lora", base, seq),
                          "memory_s": floors.memory_floor(base, a.sweep_tokens, bytes_per_s)}}
        row["ratios"] = report.ratios(row)
        out[str(width)] = row
    return out


def main(argv=None) -> dict:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    info, clock = report.machine(a), measure.clock_for(a.device)
    log(f"Qwen3 hidden={a.hidden} layers={a.layers} seq={a.seq} batch={a.batch} {a.dtype} on {a.device}, "
        f"threads={a.threads}; variants {a.variants}; load avg {info['load_avg_start'][0]:.2f}")
    t0 = time.perf_counter()
    info["bandwidth_bytes_per_s"] = bytes_per_s = measure.bandwidth(a.device, 16 if a.quick else 256)
    log(f"memory bandwidth (copy): {bytes_per_s / 1e9:.1f} GB/s")
    base = models.build_base(a.hidden, a.layers, a.seq, a.vocab, a.dtype, a.device)
    ids = tokens(a.vocab, a.batch, a.seq, a.device)
    base_fns = measure.compiled(models.frozen_base(base), a.compile_backend, ids, "base") if a.compile else None
    results = {name: bench_variant(name, base, ids, a, clock, bytes_per_s, base_fns) for name in a.variants}
    widths = sweep(a, clock, bytes_per_s)
    layouts = bench_layouts.layouts(a.batch * a.seq, [a.hidden, 3 * a.hidden], a.dtype, a.device, clock,
                                    3 if a.quick else 31)
    info["load_avg_end"], info["wall_s"] = os.getloadavg(), time.perf_counter() - t0
    print(report.report(results, widths, info, layouts))
    payload = {"setup": report.setup(a, argv), "machine": info, "results": results, "sweep": widths, "layouts": layouts,
               "targets": [{"target": w, "met": ok, "measured": g} for w, ok, g in report.targets(results)]}
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(payload, f, indent=1)
    report.chart(results, os.path.join(a.out, "bench.png"), report.title(a, info))
    log(f"done in {info['wall_s']:.0f}s: wrote {a.out}/bench.json and {a.out}/bench.png")
    return payload


if __name__ == "__main__":
    main()
