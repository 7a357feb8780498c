"""Every variant on bitsandbytes 4-bit (nf4, fp4) and 8-bit bases, on the CPU: `just bnb-smoke`.

A small Qwen3 (random weights, built from a config, saved with save_pretrained) is reloaded through
transformers' own path, `from_pretrained(..., quantization_config=BitsAndBytesConfig(...), device_map="cpu")`.
Per variant and storage: attach, train a few steps (the loss must drop), save, detach (the packed weights and
quant state must be bit-identical), reload (outputs must be exact), then the merge route: ll.load the adapter
into the float base and ll.merge. Printed per line: the loss, the reload error, the base's quantization error
(float vs quantized logits, no adapter) and the merged float model's distance to the hooked quantized one.
Exit status 1 if any line fails.

    python scripts/bnb_smoke.py [--variants lora,pissa] [--quants nf4,int8] [--steps 10]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import lora_lite as ll  # noqa: E402
import realmodel as rm  # noqa: E402
from lora_lite import weights  # noqa: E402

QUANTS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
# widths every variant accepts (GraLoRA's k divides them); 64 keeps bitsandbytes' 4-bit blocks whole
QWEN3 = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
def storage(model) -> dict[str, torch.Tensor]:
    return {f"{n}:{k}": v.clone() for n, m in model.named_modules() if weights.is_linear_like(m)
            for k, v in weights.storage(m).items()}


def run(folder: str, name: str, quant: str, steps: int, ids: torch.Tensor) -> str:
    float_model = transformers.AutoModelForCausalLM.from_pretrained(folder).train()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=transformers.BitsAndBytesConfig(**QUANTS[quant]), device_map="cpu")
    # from_pretrained returns eval mode, where bitsandbytes repacks 4-bit weights for inference, after which
    # no gradient flows through them: train mode (Qwen3 has no dropout) keeps the training layout
    model.train()
    base_err = (rm.logits(float_model, ids) - rm.logits(model, ids)).abs().max().item()
    before = storage(model)

    ll.attach(model, rm.config_for(name))
    losses, _ = rm.train(model, ids, steps, lr=1e-2)
    assert losses[-1] < 0.95 * losses[0], f"loss did not drop: {losses[0]:.3f} -> {losses[-1]:.3f}"
    y = rm.logits(model, ids)

    path = os.path.join(folder, f"{name}-{quant}.safetensors")
    ll.save(model, path)
    ll.detach(model)
    after = storage(model)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert after.keys() == before.keys() and not changed, f"detach changed {changed}"
    ll.load(model, path)
    reload_err = (rm.logits(model, ids) - y).abs().max().item()
    assert reload_err == 0, f"reload error {reload_err:.3g}"

    ll.load(float_model, path)
    ll.merge(float_model)
    merge_err = (rm.logits(float_model, ids) - y).abs().max().item()
    assert merge_err <= 2 * base_err + 1e-5, f"merged float vs hooked {quant}: {merge_err:.4f}, base {base_err:.4f}"
    return (f"loss {losses[0]:.3f} -> {losses[-1]:.3f}  reload err {reload_err:.1g}  detach exact  "
            f"base quant err {base_err:.4f}  merged-float vs hooked {merge_err:.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(sorted(ll.REGISTRY)))
    parser.add_argument("--quants", default=",".join(QUANTS))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(0, QWEN3["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(1))
    failed = 0
    with tempfile.TemporaryDirectory() as folder:
        transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3)).save_pretrained(folder)
        for name in args.variants.split(","):
            for quant in args.quants.split(","):
                try:
                    line = "ok    " + run(folder, name, quant, args.steps, ids)
                except Exception as e:  # report every cell, then fail at the end
                    failed += 1
                    line = f"FAIL  {type(e).__name__}: {e}"
                    traceback.print_exc(file=sys.stderr)
                print(f"{name:9s} {quant:5s} {line}", flush=True)
    print(f"{failed} failed" if failed else "all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
