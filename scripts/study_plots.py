"""The PNGs of `just study` (scripts/study.py): one function per figure, matplotlib's Agg backend."""
from __future__ import annotations

import os

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"lora": "C0", "pissa": "C1", "delora": "C2", "singlora": "C3", "gralora": "C4"}


def save(fig, out: str, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    return name


def band(ax, x, runs, label, color, **kw):
    """Mean over seeds as a line, min to max as a shaded band; non-finite values are left out."""
    runs = np.asarray(runs, dtype=float)
    runs = np.where(np.isfinite(runs), runs, np.nan)
    with np.errstate(all="ignore"):
        mean, lo, hi = np.nanmean(runs, 0), np.nanmin(runs, 0), np.nanmax(runs, 0)
    ax.plot(x, mean, label=label, color=color, **kw)
    ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)


def convergence(out, curves: dict, ranks, variants) -> str:
    """Training loss against step, one panel per rank, one line per variant."""
    fig, axes = plt.subplots(1, len(ranks), figsize=(4.2 * len(ranks), 3.4), sharey=True, squeeze=False)
    for ax, r in zip(axes[0], ranks):
        for v in variants:
            runs = curves[(r, v)]
            band(ax, np.arange(len(runs[0])), runs, v, COLORS[v])
        ax.set(title=f"r = {r}", xlabel="step", yscale="log")
    axes[0][0].set_ylabel("training loss (even digits)")
    axes[0][0].legend(fontsize=8)
    return save(fig, out, "pissa_convergence.png")


def lr_sweep(out, lrs, losses: dict, diverged: dict, ylabel: str, name: str, ylog: bool = True) -> str:
    """Held-out loss against learning rate, one line per variant; x marks (one row each) where a seed diverged."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for v, runs in losses.items():
        band(ax, lrs, runs, v, COLORS[v], marker=".")
    ax.set(xscale="log", yscale="log" if ylog else "linear", xlabel="learning rate (AdamW)", ylabel=ylabel)
    lo, hi = ax.get_ylim()
    for i, v in enumerate(losses):
        bad = [lr for lr, n in zip(lrs, diverged[v]) if n]
        y = hi / 1.8 ** i if ylog else hi - i * (hi - lo) / 30
        ax.plot(bad, [y] * len(bad), "x", color=COLORS[v])
    ax.legend(fontsize=8)
    return save(fig, out, name)


def norms(out, steps, series: dict, losses: dict, bound) -> str:
    """‖ΔW‖ against step (DeLoRA's bound dashed) and held-out loss against step, one line per variant."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for v in series:
        band(a, steps, series[v], v, COLORS[v])
        band(b, steps, losses[v], v, COLORS[v])
    band(a, steps, bound, "DeLoRA bound", COLORS["delora"], linestyle="--")
    a.set(xlabel="step", ylabel="‖ΔW‖_F (all adapted layers)", yscale="log")
    b.set(xlabel="step", ylabel="held-out loss (even digits)", yscale="log")
    a.legend(fontsize=8)
    return save(fig, out, "delora_norm.png")


def rank_gains(out, ranks, errors: dict, floor) -> str:
    """Held-out error of the learned update against rank, LoRA and GraLoRA; the best rank-r error dotted."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (label, runs) in enumerate(errors.items()):
        band(ax, ranks, runs, label, f"C{i}", marker="o")
    ax.plot(ranks, floor, ":", color="gray", label="best rank-r update (SVD)")
    ax.set(xscale="log", yscale="log", xlabel="rank r", ylabel="error on ordinary channels (held-out)")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # the log axis would label 20, 30, ... too
    ax.legend(fontsize=8)
    return save(fig, out, "gralora_rank.png")


def budget(out, arms: dict) -> str:
    """Held-out loss against trainable parameters for each arm (LoRA r=k, SingLoRA r=k, SingLoRA r=2k)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (label, (params, runs)) in enumerate(arms.items()):
        band(ax, params, runs, label, f"C{i}", marker="o")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="held-out loss (shifted text)")
    ax.legend(fontsize=8)
    return save(fig, out, "singlora_budget.png")
