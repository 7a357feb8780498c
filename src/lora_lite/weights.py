"""The one place that knows how a linear-like layer stores its weight.

Supported: nn.Linear (W is (d_out, d_in)), transformers' Conv1D (GPT-2; stored
transposed as (d_in, d_out), `nf` outputs), bitsandbytes Linear4bit and
Linear8bitLt. bitsandbytes quantizes when the layer is moved to a device
(`.to("cpu")` counts); from then on:

- Linear4bit (nf4 or fp4, the default): `weight` is packed uint8 of shape
  (d_out * d_in / 2, 1); the true shape, absmax, code (and the nested state
  of double quantization) live in `weight.quant_state`.
- Linear8bitLt (has_fp16_weights=False): `weight` is int8 (d_out, d_in) with
  per-row scales in `weight.SCB`; the first forward moves them to
  `layer.state.SCB` (and `weight.CB` to `layer.state.CB`), leaving None behind.

On CPUs with AVX512-BF16, the first Linear4bit forward in eval mode without
gradients repacks the weight in place for bitsandbytes' CPU kernel
(`quant_state.packing_format_for_cpu`): data becomes (d_out, d_in / 2) in
another nibble order, absmax becomes bf16 of shape (d_in / blocksize, d_out),
the nested state is dropped. `dense_weight` reads that layout too.

Checked against bitsandbytes 0.50.2 on the CPU (tests/test_quantized.py).
"""
from __future__ import annotations

import torch
from torch import nn


def is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf") and hasattr(layer, "weight")


def is_linear_like(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear) or is_conv1d(layer):
        return True
    # bitsandbytes-style and other structural linears
    return (isinstance(getattr(layer, "in_features", None), int)
            and isinstance(getattr(layer, "out_features", None), int)
            and isinstance(getattr(layer, "weight", None), torch.Tensor))


def dims(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like layer, whatever the storage (a 4-bit weight's shape is the packed one)."""
    if is_conv1d(layer):
        return layer.weight.shape[0], layer.nf
    return layer.in_features, layer.out_features


def param_count(p: torch.Tensor) -> int:
    """The parameters `p` stands for, as PEFT counts them: a bitsandbytes 4-bit weight packs two values a byte
    (times the bytes of its storage type), so its numel is the packed one."""
    return p.numel() * 2 * p.element_size() if type(p).__name__ == "Params4bit" else p.numel()


def is_quantized(layer: nn.Module) -> bool:
    w = layer.weight
    return getattr(w, "quant_state", None) is not None or not w.dtype.is_floating_point


def is_cpu_repacked(layer: nn.Module) -> bool:
    """A bitsandbytes 4-bit weight repacked for the CPU inference kernel (see above). bitsandbytes 0.50.2
    registers no backward for that kernel: no gradient flows through the layer to its input any more
    (None without a bias, an in-place error with one), so earlier adapters train on wrong gradients."""
    return getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False)


CPU_REPACK = "support_avx512bf16_for_cpu"  # bitsandbytes Linear4bit's switch for the repack above


def hold_cpu_repack(model: nn.Module) -> dict[str, bool]:
    """Turn the CPU repack off on every Linear4bit of `model`, so that an eval-mode, no-grad forward
    while an adapter is attached cannot cut the gradient path of later training. Returns the old
    switches by module name, for `release_cpu_repack`."""
    held = {}
    for name, m in model.named_modules():
        if CPU_REPACK in m.__dict__:
            held[name] = m.__dict__[CPU_REPACK]
            m.__dict__[CPU_REPACK] = False
    return held


def release_cpu_repack(model: nn.Module, held: dict[str, bool]) -> None:
    for name, m in model.named_modules():
        if name in held:
            m.__dict__[CPU_REPACK] = held[name]


def _int8_scales(layer: nn.Module) -> torch.Tensor:
    scb = getattr(layer.weight, "SCB", None)
    if scb is None:  # after the first forward
        scb = getattr(getattr(layer, "state", None), "SCB", None)
    if scb is None:
        raise ValueError(f"int8 layer {type(layer).__name__} has no SCB scales: was it quantized (moved to a device)?")
    return scb


def _unpack_cpu_layout(data: torch.Tensor, quant_state):
    """(packed data, quant_state) in bitsandbytes' standard 4-bit layout, from its CPU-kernel layout; the
    layer is not touched. bitsandbytes' own inverse re-quantizes a nested absmax and leaves a plain one
    transposed, so it undoes only the nibble order here, on a copy of the state; absmax is restored by hand."""
    import copy

    import bitsandbytes.functional as bnbf

    state = copy.copy(quant_state)  # the inverse reassigns attributes of the state it is given
    state.original_nested = False
    data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
    state.absmax = quant_state.absmax.t().reshape(-1).float()  # (d_in/blocksize, d_out) -> block order
    return data, state


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense float32 (d_out, d_in) tensor (dequantized when needed; never a view)."""
    w = layer.weight
    if is_conv1d(layer):
        return w.detach().t().float().clone()
    quant_state = getattr(w, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        data = w.data
        if is_cpu_repacked(layer):
            data, quant_state = _unpack_cpu_layout(data, quant_state)
        return bnbf.dequantize_4bit(data, quant_state).float().reshape(quant_state.shape)
    if w.dtype == torch.int8:
        import bitsandbytes.functional as bnbf

        return bnbf.int8_vectorwise_dequant(w.data, _int8_scales(layer)).float()
    return w.detach().float().clone()


def storage(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors that hold a linear-like layer's base weight, by name: for bitsandbytes the packed data
    and the quant state (absmax, code, shape, nested state) or the int8 row scales, which `state_dict` hides
    or re-encodes. For checking that something (detach, a failed merge) left the base bit for bit as it was."""
    w = layer.weight
    out = {"weight": w.data}
    quant_state = getattr(w, "quant_state", None)
    if quant_state is not None:
        out |= {"absmax": quant_state.absmax, "code": quant_state.code, "shape": torch.tensor(quant_state.shape)}
        if quant_state.nested:
            out |= {"offset": quant_state.offset, "absmax2": quant_state.state2.absmax,
                    "code2": quant_state.state2.code}
    elif w.dtype == torch.int8:
        out["SCB"] = _int8_scales(layer)
    if getattr(layer, "bias", None) is not None:
        out["bias"] = layer.bias.data
    return out


def add_to_weight(layer: nn.Module, delta: torch.Tensor) -> None:
    """W += delta, with delta (d_out, d_in), in the layer's storage orientation and dtype. Float weights only."""
    if is_quantized(layer):
        raise TypeError(f"cannot write into a quantized {type(layer).__name__} weight")
    w = layer.weight
    with torch.no_grad():
        w.add_((delta.t() if is_conv1d(layer) else delta).to(w.dtype))
