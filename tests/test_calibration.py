"""group_init: data-calibrated initialisation, proven with a variant registered only for these tests.

`PCA` is LoRA whose A holds the top-r principal directions of each layer's calibration inputs
(eigenvectors of Σ xᵀx), collected with `lora_lite.calibration.capture_inputs`.
"""
from dataclasses import dataclass

import pytest
import tiny
import torch
from tiny import PCA, PCAConfig, calibration, input_grams, registered

import lora_lite as ll
from lora_lite.variants.lora import LoRAConfig


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_group_init_gets_targets_and_data(pca):
    model, data = tiny.TinyLM(), calibration()
    handle = ll.attach(model, PCAConfig(r=4, alpha=8.0), calibration_data=data)
    ((names, got),) = pca.calls
    assert names == [t.name for t in handle.targets] and got is data
    model(data[0])  # ends the first-forward watch
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
