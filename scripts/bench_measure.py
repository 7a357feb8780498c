"""How `scripts/bench.py` measures: clocks per device, the train step and inference calls, interleaved runs,
peak memory, memory bandwidth and compiling a model once before it is timed.

On CUDA a clock is a pair of events around the call and a synchronize before reading them (kernels run
asynchronously: the host clock alone would time the launches); peak memory is torch.cuda.max_memory_allocated.
On the CPU the clock is perf_counter and peak memory comes from the profiler's memory events.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class HostClock:
    """Seconds per call by perf_counter: exact on the CPU, where every op has finished when it returns."""

    device = "cpu"

    def time(self, fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


class CudaClock:
    """Seconds per call by CUDA events recorded around it, read after a synchronize."""

    device = "cuda"

    def time(self, fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3


def clock_for(device: str):
    return CudaClock() if torch.device(device).type == "cuda" else HostClock()


def train_step(model, ids):
    """Forward, cross-entropy, backward, AdamW on the trainable tensors (none for the frozen base)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        model.train()  # a compiled model shares its module with inference: set the mode on every call
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def infer(model, ids):
    def run():
        model.eval()  # a compiled model shares its module with the train step: set the mode on every call
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    return run


def interleaved(fns: dict, repeats: int, label: str, clock) -> dict[str, list[float]]:
    """Seconds per call of each fn, run round-robin after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for i in range(repeats):
        for k, fn in fns.items():
            times[k].append(clock.time(fn))
        log(f"{label} {i + 1}/{repeats}: " + "  ".join(f"{k} {1e3 * v[-1]:.1f}ms" for k, v in times.items()))
    return times


def medians(times: dict) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def peak_bytes(fn, device: str) -> int:
    """Peak tensor bytes live during fn() beyond those live before it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def bandwidth(device: str, mib: int = 256, repeats: int = 9) -> float:
    """Bytes per second of a large copy (read + write counted), median over repeats: far beyond the caches."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    clock = clock_for(device)
    dst.copy_(src)  # first touch of dst's pages is not a copy
    seconds = statistics.median(clock.time(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * src.element_size() / seconds


def compiled(model, backend: str, ids, label: str):
    """torch.compile(model), compiled here for both the train step and inference, so no timed call compiles."""
    import torch._dynamo.config as dynamo_config

    # one code object (the model class's forward) serves every model in the process: room for all their graphs
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 256))
    fast = torch.compile(model, backend=backend)
    t = time.perf_counter()
    step, run = train_step(fast, ids), infer(fast, ids)
    step()
    run()
    log(f"{label}: compiled ({backend}) train and inference in {time.perf_counter() - t:.0f}s")
    return step, run
