"""Export every variant to a PEFT adapter folder, load it with PEFT, and compare outputs.

    just peft-roundtrip                      # every variant, tiny Llama and GPT-2 (Conv1D), a few seconds
    just peft-roundtrip --variants pissa --steps 20

For each architecture and variant: attach to every reader and writer, train a few AdamW steps on one fixed
batch of byte tokens, then for each form (`native`, `lora`) write `ll.export_peft(model, folder, form)`, load it
with PEFT 0.21's `PeftModel.from_pretrained(base, folder)` on a fresh copy of the base, and print the largest
logit difference relative to the largest lora-lite logit; `import` is `ll.load` of the native folder on a fresh
copy, against the same outputs. Exit status 1 when any error is over 1e-5.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import warnings

import torch

import lora_lite as ll
import realmodel as rm

TOL = 1e-5
ARCHS = {"llama": rm.tiny_llama, "gpt2": rm.tiny_gpt2}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", help="comma-separated, default: every registered variant")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, from {list(ARCHS)}")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-2)
    return p.parse_args(argv)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def peft_logits(base, folder: str, ids: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Outputs of PEFT's own loader on a fresh copy of the base, and the modules it adapted."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and on its version
        ref = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    adapted = [n.removeprefix("base_model.model.") for n, m in ref.named_modules() if hasattr(m, "base_layer")]
    return rm.logits(ref, ids), adapted


def roundtrip(base, name: str, ids: torch.Tensor, steps: int, lr: float, tmp: str) -> dict:
    """Train `name` on a copy of `base`, export both forms, load them with PEFT and ll.load; the errors."""
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    ll.attach(model, rm.config_for(name, r=8))
    rm.train(model, ids, steps, lr)
    want = rm.logits(model, ids)
    targets = [n for n, _ in ll.adapted_layers(model)]
    row = {"effect": rel_err(rm.logits(base, ids), want), "same_targets": True}  # effect: the check is not vacuous
    for form in ("native", "lora"):
        folder = os.path.join(tmp, f"{name}-{form}")
        ll.export_peft(model, folder, form=form)
        with open(os.path.join(folder, "adapter_config.json")) as f:
            config = json.load(f)
        got, adapted = peft_logits(base, folder, ids)
        row[form] = (f"{config['peft_type']} r={config['r']}", rel_err(got, want))
        row["same_targets"] &= adapted == targets  # an extra module PEFT adapted would start at B = 0, unseen
    fresh = copy.deepcopy(base)
    ll.load(fresh, os.path.join(tmp, f"{name}-native"))
    row["import"] = rel_err(rm.logits(fresh, ids), want)
    return row


def main(argv=None) -> int:
    args = parse(argv)
    names = rm.variants(args.variants)
    ids = rm.windows(rm.text_ids(), batch=2, seq=32)
    print(f"max |PEFT - lora-lite| / max |lora-lite| over the logits, fp32; {args.steps} AdamW steps at lr {args.lr},"
          f" r=8 on every reader and writer")
    print(f"{'model':<6} {'variant':<9} {'base vs trained':<16} {'native (PEFT type)':<30} {'lora (plain LoRA)':<24} "
          f"{'import native':<13}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            base = ARCHS[arch]()
            for name in names:
                row = roundtrip(base, name, ids, args.steps, args.lr, tmp)
                (nt, ne), (lt, le), ie = row["native"], row["lora"], row["import"]
                worst = max(worst, ne, le, ie, 0.0 if row["same_targets"] else float("inf"))
                native, plain = f"{ne:.1e} ({nt})", f"{le:.1e} ({lt})"
                print(f"{arch:<6} {name:<9} {row['effect']:<16.1e} {native:<30} {plain:<24} {ie:.1e}"
                      f"{'' if row['same_targets'] else '  PEFT adapted other modules'}", flush=True)
    print("OK" if worst <= TOL else f"FAIL: an error of {worst:.1e} is over {TOL}")
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
