"""DDP and FSDP2 with gloo on the CPU, and the order rule: attach first, then wrap.

One spawn of 2 processes (127.0.0.1, a free port, a hard timeout) runs every variant under DDP
(gradients of one backward on half a batch each) and under FSDP2 (`fully_shard`, a few AdamW steps,
then `ll.save` from the sharded model). The test process computes the single-process reference on
the full batch and compares. The order errors are checked in-process, in a 1-process gloo group.
"""
import datetime
import os
import socket
import time

import pytest
import tiny
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import perturb
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import lora_lite as ll

WORLD, STEPS, LR, TIMEOUT = 2, 3, 1e-3, 240
IDS = tiny.tokens(4, 8)


def model_for(name):
    model = tiny.TinyLM(d=16, f=32, n_layers=2, seed=0)
    ll.attach(model, tiny.cfg_for(name))
    perturb(model)
    return model


def train(model, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        tiny.lm_loss(model, ids).backward()
        opt.step()


def grads(model):
    return {n.removeprefix("module."): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        local = IDS.chunk(WORLD)[rank]
        ddp_grads = {}
        for name in sorted(ll.REGISTRY):
            model = DDP(model_for(name))  # attach first, then wrap
            tiny.lm_loss(model, local).backward()
            ddp_grads[name] = grads(model)
        torch.save(ddp_grads, os.path.join(out, f"ddp{rank}.pt"))
        for name in sorted(ll.REGISTRY):
            model = model_for(name)
            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
            train(model, local)
            ll.save(model, os.path.join(out, f"fsdp_{name}.safetensors"))  # every rank: it gathers the shards
        dist.barrier()  # rank 0 hosts the store: it must not exit while rank 1 still talks to it
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist"))
    ctx = mp.start_processes(_worker, args=(free_port(), out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):  # raises if a worker failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers still running after {TIMEOUT} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
            p.join(10)
    return out


def test_ddp_gradients_equal_single_process_full_batch(spawned):
    per_rank = [torch.load(os.path.join(spawned, f"ddp{r}.pt")) for r in range(WORLD)]
    for name in sorted(ll.REGISTRY):
        model = model_for(name)
        tiny.lm_loss(model, IDS).backward()
        ref = grads(model)
        model.zero_grad()
        tiny.lm_loss(model, IDS.chunk(WORLD)[0]).backward()
        half = grads(model)
        assert any(not torch.allclose(half[k], ref[k], atol=1e-4) for k in ref), "the halves must differ"
        for rank, got in enumerate(per_rank):
            assert got[name].keys() == ref.keys()
            for key, g in ref.items():
                assert torch.allclose(got[name][key], g, atol=1e-6), f"{name} rank {rank} {key}"


def test_fsdp2_saved_adapter_equals_single_process(spawned):
    for name in sorted(ll.REGISTRY):
        ref = model_for(name)
        train(ref, IDS)
        fresh = tiny.TinyLM(d=16, f=32, n_layers=2, seed=0)
        ll.load(fresh, os.path.join(spawned, f"fsdp_{name}.safetensors"))
        got, want = tiny.lora_tensors(fresh), tiny.lora_tensors(ref)
        assert got.keys() == want.keys()
        moved = tiny.lora_tensors(model_for(name))
        assert any(not torch.equal(moved[k], want[k]) for k in want), f"{name}: training changed nothing"
        for key in want:
            assert torch.allclose(got[key], want[key], atol=1e-6), f"{name} {key}: {(got[key] - want[key]).abs().max()}"


def everything(model):
    """Tensors, requires_grad flags and hook counts (FSDP2 has hooks of its own): what a refusal must not touch."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
            [n for n, m in model.named_modules() if any(k.startswith("lora_") for k in m.__dict__)])


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["ddp", "fully_shard_root", "fully_shard_blocks"])
def test_attach_or_load_after_wrapping_is_refused(one_process_group, wrap, tmp_path):
    donor = tiny.TinyLM()
    ll.attach(donor, tiny.cfg_for("lora"))
    ll.save(donor, tmp_path / "a.safetensors")
    model = tiny.TinyLM()
    if wrap == "ddp":
        wrapped = DDP(model)
    else:
        for block in model.layers:
            fully_shard(block)
        wrapped = fully_shard(model) if wrap == "fully_shard_root" else model
    before = everything(model)
    what = "DistributedDataParallel" if wrap == "ddp" else "fully_shard"
    with pytest.raises(ValueError, match=rf"{what}.*attach \(or load\) the adapter first"):
        ll.attach(wrapped, tiny.cfg_for("lora"))
    with pytest.raises(ValueError, match=rf"{what}.*attach \(or load\) the adapter first"):
        ll.load(wrapped, tmp_path / "a.safetensors")
    after = everything(model)
    assert after[1:] == before[1:] and after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
