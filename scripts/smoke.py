"""The first check to run: every registered variant, end to end, on a tiny real transformers model.

    just smoke                       # all variants, a few seconds each on a CPU
    just smoke --variants lora,pissa --steps 20

For each variant, on a fresh random Qwen3 (hidden 64, 2 layers, built from a config; nothing is downloaded):
attach to every reader and writer of layer 0 (q, k, v, o, gate, up, down), train one fixed batch of byte tokens
for a few AdamW steps, save, detach (the base must be bit for bit what it was), reload from the file (outputs
must match the trained model), and merge (the merged weights must give the hooked outputs). One line per
variant, then OK, or FAIL with exit status 1.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch

import lora_lite as ll
import realmodel as rm

RELOAD_TOL = 1e-5
MERGE_TOL = 1e-5  # relative to the largest logit


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", help="comma-separated, default: every registered variant")
    p.add_argument("--layers", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def check(name: str, base, ids, out_base, args) -> tuple[str, list[str]]:
    """Run one variant end to end; return its report line and the list of failed checks."""
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    snapshot = rm.base_snapshot(model)
    torch.manual_seed(args.seed)
    handle = ll.attach(model, rm.config_for(name, layers=tuple(args.layers)))
    losses, _ = rm.train(model, ids, args.steps, args.lr)
    out_trained = rm.logits(model, ids)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.safetensors")
        ll.save(model, path)
        ll.detach(model)
        detach_exact = (rm.same_tensors(model, snapshot) and torch.equal(rm.logits(model, ids), out_base)
                        and all(p.requires_grad for p in model.parameters()))
        ll.load(model, path)
    reload_err = rm.max_diff(rm.logits(model, ids), out_trained)
    ll.merge(model)
    merge_err = rm.max_diff(rm.logits(model, ids), out_trained) / out_trained.abs().max().item()
    seconds = time.perf_counter() - t0

    loss0, lossN = losses[0], losses[-1]
    failed = ([] if lossN < loss0 else ["loss did not drop"]) + \
             ([] if detach_exact else ["detach not bit-exact"]) + \
             ([] if reload_err <= RELOAD_TOL else [f"reload err > {RELOAD_TOL}"]) + \
             ([] if merge_err <= MERGE_TOL else [f"merge err > {MERGE_TOL}"]) + \
             ([] if not rm.lora_state(model) else ["lora_* tensors left after merge"])
    line = (f"{name:<9} {len(handle.targets)} modules  loss {loss0:.4f} -> {lossN:.4f} "
            f"({100 * (loss0 - lossN) / loss0:4.1f}% drop)  detach {'exact' if detach_exact else 'CHANGED'}  "
            f"reload err {reload_err:.1e}  merge err {merge_err:.1e}  {seconds:5.2f} s  "
            f"{'ok' if not failed else 'FAIL: ' + '; '.join(failed)}")
    return line, failed


def main(argv=None) -> int:
    args = parse(argv)
    names = rm.variants(args.variants)
    base = rm.tiny_qwen3(seed=args.seed)
    ids = rm.windows(rm.text_ids())
    out_base = rm.logits(base, ids)
    print(f"tiny Qwen3 (random, hidden 64, 2 layers), readers+writers of layers {args.layers}, "
          f"{args.steps} steps at lr {args.lr}, torch {torch.__version__}", flush=True)
    failures = []
    for name in names:
        line, failed = check(name, base, ids, out_base, args)
        print(line, flush=True)
        failures += [f"{name}: {f}" for f in failed]
    print("OK" if not failures else "FAIL: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
