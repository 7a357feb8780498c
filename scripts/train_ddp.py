"""Data-parallel adapter training with DDP: the order that works, end to end.

    torchrun --nproc-per-node 2 scripts/train_ddp.py                     # gloo on CPU, nccl on GPUs
    torchrun --nproc-per-node 2 scripts/train_ddp.py --variant pissa --steps 20 --out pissa.safetensors

Attach BEFORE wrapping in DistributedDataParallel: DDP all-reduces the gradients of the parameters it
sees when it is built, so adapters added afterwards would train per rank without sync (ll.attach refuses
a DDP-wrapped model for that reason). Each rank trains on its share of one fixed batch of a tiny random
Qwen3 (or `--model`, a local transformers checkpoint); rank 0 saves the adapter. At the end every rank's
adapter checksum is compared, to show the ranks stayed in sync.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import lora_lite as ll
import realmodel as rm


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="lora", choices=sorted(ll.REGISTRY))
    p.add_argument("--model", help="a local transformers checkpoint (default: a tiny random Qwen3)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank")
    p.add_argument("--out", default="adapter.safetensors")
    return p.parse_args(argv)


def train(ddp, opt, vocab, args, device, rank, world) -> None:
    """Each rank trains on its share of the global batch; rank 0 prints the mean loss."""
    ids = rm.windows(rm.text_ids(), batch=args.batch * world, seq=64).remainder(vocab).to(device)
    local = ids.chunk(world)[rank]  # this rank's share of the global batch
    for step in range(args.steps):
        opt.zero_grad()
        loss = ddp(input_ids=local, labels=local).loss
        loss.backward()  # DDP averages the adapter gradients over ranks here
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step}  loss {mean.item() / world:.4f}", flush=True)


def report(ddp, out, rank, world) -> None:
    """Every rank's adapter checksum must agree (gradients were synced); rank 0 saves the adapter."""
    checksum = torch.stack([p.detach().double().sum() for p in ddp.parameters() if p.requires_grad]).sum()
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if rank == 0:
        ll.save(ddp, out)  # canonical keys: DDP's `module.` prefix is stripped
        same = all(torch.equal(s, sums[0]) for s in sums)
        print(f"{world} ranks {'in sync' if same else 'DIVERGED'}; saved {out}")
        if not same:
            raise SystemExit(1)


def main(argv=None) -> None:
    args = parse(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        if args.model:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(args.model)
        else:
            model = rm.tiny_qwen3()
        model.to(device).train()
        torch.manual_seed(0)  # the same adapter init on every rank (DDP also broadcasts rank 0's at wrap time)
        ll.attach(model, rm.config_for(args.variant))  # 1. attach
        ddp = DDP(model, device_ids=[device.index] if cuda else None)  # 2. then wrap
        opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=args.lr)
        ll.track_steps(opt, ddp)

        train(ddp, opt, model.config.vocab_size, args, device, rank, world)
        report(ddp, args.out, rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
