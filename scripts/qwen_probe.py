"""Every adapter variant on a real Qwen3 architecture: targets, identity, loss drop, gradient, reload error.

    just qwen-probe                                  # tiny random Qwen3 (hidden 64, 2 layers), byte tokens
    just qwen-probe --variants lora,pissa --steps 50 --json probe.json
    just qwen-probe --model /path/to/Qwen3-0.6B      # a local checkpoint (or a cached hub id); never downloads

For each variant, on a fresh copy of the same base: attach to `--targets` of `--layers`, train one fixed batch
of scripts/text.txt for `--steps` AdamW steps, save, reload into the untouched base, and print one row:

    identity err   max |out_attached - out_base| at t=0                (should be 0 or float rounding)
    perturb delta  max output change when the lora_* tensors get noise (hooks are live), then restored;
                   step-scheduled variants (SingLoRA) are set past their ramp for this check, since u(0) = 0
    loss0, lossN   loss on the batch before the first and after the last step; drop % between them
    grad norm      adapter gradient norm at the first step (0 for SingLoRA by design: u(0) = 0)
    adapter delta  max |out_trained - out_base|
    reload err     max |out_reloaded - out_trained| (after ll.save + ll.load on the original base)

Text is tokenized byte by byte (vocab 256) for the built-in model; with `--model` the checkpoint's own tokenizer
is used when one is stored with it locally, else bytes. Exits 1 if any reload err > 1e-5 or lossN >= loss0.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile

import torch

import lora_lite as ll
import realmodel as rm

RELOAD_TOL = 1e-5


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="local path or cached hub id for AutoModelForCausalLM (offline); "
                                   "default: a tiny random Qwen3 built from Qwen3Config")
    p.add_argument("--variants", help="comma-separated, default: every registered variant")
    p.add_argument("--targets", nargs="+", default=[r"\.q_proj$", r"\.v_proj$"], help="target_names regexes")
    p.add_argument("--layers", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows to this file as a JSON list")
    return p.parse_args(argv)


def load_base(args) -> tuple[torch.nn.Module, torch.Tensor]:
    """The base model (eval mode, float32) and the fixed training batch."""
    if not args.model:
        return rm.tiny_qwen3(seed=args.seed), rm.windows(rm.text_ids(), args.batch, args.seq)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=torch.float32).eval()
    tokenizer = local_tokenizer(args.model)
    ids = rm.windows(rm.text_ids(tokenizer), args.batch, args.seq)
    if ids.max() >= model.config.vocab_size:
        raise SystemExit(f"token id {ids.max().item()} >= vocab_size {model.config.vocab_size} of {args.model}")
    return model, ids


def local_tokenizer(model_id: str):
    """The tokenizer stored with the checkpoint, else None (transformers would build an empty one)."""
    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    try:
        cached_file(model_id, "tokenizer_config.json", local_files_only=True)
    except OSError:
        rm.progress(f"no tokenizer stored with {model_id}: using UTF-8 bytes as token ids")
        return None
    return AutoTokenizer.from_pretrained(model_id, local_files_only=True)


def perturb_delta(model, ids, out) -> float:
    """Output change with noise on every floating lora_* tensor (ramps set to their end); then restored."""
    state = rm.lora_state(model)
    saved = {k: v.clone() for k, v in state.items()}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for v in state.values():
            if v.is_floating_point():
                v.add_(0.1 * torch.randn(v.shape, generator=g).to(v))
        ll.set_step(model, 10**9)
        delta = rm.max_diff(rm.logits(model, ids), out)
        for k, v in state.items():
            v.copy_(saved[k])
    return delta


def probe(name: str, base, ids, args, out_base) -> dict:
    model = copy.deepcopy(base)
    cfg = rm.config_for(name, r=args.r, alpha=args.alpha, target_names=tuple(args.targets),
                        layers=tuple(args.layers), target_roles=())
    torch.manual_seed(args.seed)  # each variant's random init is independent of which variants ran before
    handle = ll.attach(model, cfg)
    trainable = sum(p.numel() for p in rm.adapter_params(model))
    out0 = rm.logits(model, ids)
    identity = rm.max_diff(out0, out_base)
    perturb = perturb_delta(model, ids, out_base)

    def log(step, loss):
        if step % 10 == 0 or step == args.steps - 1:
            rm.progress(f"  {name} step {step:3d}/{args.steps} loss {loss:.4f}")

    losses, grad0 = rm.train(model, ids, args.steps, args.lr, log)
    out_trained = rm.logits(model, ids)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{name}.safetensors")
        ll.save(model, path)
        ll.load(base, path)  # the untouched base: the file alone must reproduce the trained model
    out_reloaded = rm.logits(base, ids)
    ll.detach(base)
    loss0, lossN = losses[0], losses[-1]
    return {"variant": name, "targets": [t.name for t in handle.targets], "trainable": trainable,
            "identity_err": identity, "perturb_delta": perturb, "loss0": loss0, "lossN": lossN,
            "drop_pct": 100.0 * (loss0 - lossN) / loss0, "grad_norm": grad0,
            "adapter_delta": rm.max_diff(out_trained, out_base), "reload_err": rm.max_diff(out_reloaded, out_trained)}


def table(rows: list[dict]) -> str:
    head = ("variant", "targets", "trainable", "identity err", "perturb delta", "loss0", "lossN", "drop %",
            "grad norm", "adapter delta", "reload err")
    lines = [head]
    for r in rows:
        leaves = sorted({t.rsplit(".", 1)[-1] for t in r["targets"]})
        lines.append((r["variant"], f"{len(r['targets'])} {','.join(leaves)}", f"{r['trainable']:,}",
                      f"{r['identity_err']:.1e}", f"{r['perturb_delta']:.2e}", f"{r['loss0']:.4f}",
                      f"{r['lossN']:.4f}", f"{r['drop_pct']:.1f}", f"{r['grad_norm']:.2e}",
                      f"{r['adapter_delta']:.2e}", f"{r['reload_err']:.1e}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(text)


def main(argv=None) -> int:
    args = parse(argv)
    names = rm.variants(args.variants)
    base, ids = load_base(args)
    out_base = rm.logits(base, ids)
    rm.progress(f"model {args.model or 'tiny Qwen3 (random, hidden 64, 2 layers)'}, batch {tuple(ids.shape)}, "
                f"{args.steps} steps, lr {args.lr}, variants {names}")
    rows = []
    for name in names:
        rm.progress(f"{name}: attach {args.targets} layers {args.layers}")
        rows.append(probe(name, base, ids, args, out_base))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [f"{r['variant']}: reload err {r['reload_err']:.1e} > {RELOAD_TOL}" for r in rows
           if not r["reload_err"] <= RELOAD_TOL]
    bad += [f"{r['variant']}: lossN {r['lossN']:.4f} >= loss0 {r['loss0']:.4f}" for r in rows
            if not r["lossN"] < r["loss0"]]
    if any(r["grad_norm"] == 0 and ll.REGISTRY[r["variant"]].on_step is not ll.Variant.on_step for r in rows):
        print("grad norm 0: a step-scheduled variant (SingLoRA) has ramp u(0) = 0, so no gradient at step 0")
    for line in bad:
        print("FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
