"""group_init: data-calibrated initialisation, proven with a variant registered only for these tests.

`PCA` is LoRA whose A holds the top-r principal directions of each layer's calibration inputs
(eigenvectors of Σ xᵀx), collected with `lora_lite.variant.capture_inputs`.
"""
import contextlib
from dataclasses import dataclass

import pytest
import torch

import lora_lite as ll
import tiny
from lora_lite.config import CONFIGS
from lora_lite.variant import ParamSpec, capture_inputs, zeros
from lora_lite.variants.lora import LoRA, LoRAConfig


@contextlib.contextmanager
def registered(cls):
    """Register a test-only variant for the duration of a test, so it never leaks into parametrization."""
    ll.register(cls)
    try:
        yield cls
    finally:
        ll.REGISTRY.pop(cls.name, None)
        CONFIGS.pop(cls.name, None)


@dataclass
class PCAConfig(LoRAConfig):
    pass


def input_grams(model, targets, data, fn=None):
    """{layer: Σ xᵀx over every token of the calibration batches}."""
    grams = {}

    def collect(layer, x):
        x = x.reshape(-1, x.shape[-1]).float()
        grams[layer] = grams.get(layer, 0) + x.t() @ x
        if fn is not None:
            fn(layer, x)

    capture_inputs(model, [t.layer for t in targets], data, collect)
    return grams


class PCA:
    name = "test_pca"
    config = PCAConfig
    calls = []  # (target names, calibration data) of every group_init call

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), None), "lora_B": ParamSpec((d_out, cfg.r), zeros)}

    @staticmethod
    def group_init(model, targets, cfg, calibration_data):
        if calibration_data is None:
            raise ValueError("test_pca needs calibration_data")
        PCA.calls.append(([t.name for t in targets], calibration_data))
        grams = input_grams(model, targets, calibration_data)
        with torch.no_grad():
            for t in targets:
                _, vectors = torch.linalg.eigh(grams[t.layer])  # ascending eigenvalues
                t.layer.lora_A.copy_(vectors[:, -cfg.r:].flip(1).t())

    forward = LoRA.forward
    delta_weight = LoRA.delta_weight


@pytest.fixture
def pca():
    PCA.calls.clear()
    with registered(PCA):
        yield PCA


def calibration():
    return [tiny.tokens(batch=2, seed=s) for s in (10, 11)]


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_group_init_gets_targets_and_data(pca):
    model, data = tiny.TinyLM(), calibration()
    handle = ll.attach(model, PCAConfig(r=4, alpha=8.0), calibration_data=data)
    ((names, got),) = pca.calls
    assert names == [t.name for t in handle.targets] and got is data
    assert hooks(model) == len(handle.targets)  # the capture hooks are gone, the adapter's stay
    # layers.0.q_proj reads the embeddings: its A must be their top principal directions
    x = torch.cat([model.embed_tokens(ids) for ids in data]).reshape(-1, 32).detach()
    _, vectors = torch.linalg.eigh(x.t() @ x)
    top = vectors[:, -4:]
    A = model.layers[0].q_proj.lora_A.detach()
    assert torch.allclose(A @ A.t(), torch.eye(4), atol=1e-5)
    assert torch.allclose(A.t() @ A, top @ top.t(), atol=1e-4)


@dataclass
class BrokenConfig(LoRAConfig):
    pass


class Broken(PCA):
    name = "test_broken_pca"
    config = BrokenConfig

    @staticmethod
    def group_init(model, targets, cfg, calibration_data):
        def boom(layer, x):
            if layer is targets[3].layer:
                raise RuntimeError("calibration failed midway")

        input_grams(model, targets, calibration_data, boom)


def test_group_init_error_removes_hooks_and_adapter():
    model = tiny.TinyLM()
    model.lm_head.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with registered(Broken):
        with pytest.raises(RuntimeError, match="midway"):
            ll.attach(model, BrokenConfig(r=4), calibration_data=calibration())
    assert hooks(model) == 0
    assert ll.adapted_layers(model) == []
    assert not any(k.startswith("lora_") for m in model.modules() for k in m.__dict__)
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_reload_reproduces_without_calibration_data(pca, tmp_path):
    model, ids = tiny.TinyLM(), tiny.tokens()
    ll.attach(model, PCAConfig(r=4, alpha=8.0), calibration_data=calibration())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        tiny.lm_loss(model, ids).backward()
        opt.step()
    want = model(ids)
    ll.save(model, tmp_path / "pca.safetensors")
    fresh = tiny.TinyLM()
    ll.load(fresh, tmp_path / "pca.safetensors")  # group_init would raise without data: it must not run
    assert len(pca.calls) == 1
    assert torch.equal(fresh(ids), want)
