"""`just study`: each variant's paper claim, tested at CPU scale, with plots and a plain verdict.

    just study                                     # = python scripts/study.py --out results/study (minutes)
    python scripts/study.py --quick --out /tmp/s   # the same code on tiny settings (seconds): checks the script

Each experiment tests one claim on a task from scripts/study_tasks.py (digits MLP, outlier-channel
regression, a tiny pretrained causal LM), with every registered variant attached through the public API
(`ll.attach`, `ll.track_steps`, `ll.save`/`ll.load`, `delta_weight`, `ll.adapted_layers`). Its decision rule
is a constant below, fixed before the run and printed with the result; the verdict is one of
"reproduced", "not reproduced", "mixed". Seeds are fixed, so a rerun on the same machine gives the same
numbers. Writes DIR/study.json (a list: one object per experiment with name, claim, paper, setup, rule,
verdict, numbers, plot) and the PNGs beside it. Progress on stderr, results on stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lora_lite as ll  # noqa: E402
import study_plots as plots  # noqa: E402
import study_tasks as t  # noqa: E402

VARIANTS = sorted(ll.REGISTRY)
VERDICTS = ("reproduced", "not reproduced", "mixed")
SWEEP_R = 4  # the rank of the learning-rate sweep and the long run (digits)
MATCH = 0.01  # "matches": a held-out loss at most 1% above the other's
# One torch thread: the models are so small that a second thread costs more in synchronisation than it
# saves (8x slower on a shared 2-core machine), and a fixed count keeps the numbers the same run to run.
THREADS = 1

RULE_PISSA = (
    "Per rank r: early loss = mean training loss over the first quarter of the steps, every variant at the same "
    "learning rate. PiSSA is faster at r when its early loss is below LoRA's in every seed. reproduced: faster at "
    "every r; not reproduced: faster at no r; mixed: otherwise.")
RULE_LR_BAND = (
    "Learning-rate grid; per variant the held-out loss (mean over seeds) at each point. band = the contiguous run "
    "of grid points around the variant's best whose loss is within 10% of that best, in decades; divergences = "
    "grid points where a seed's loss went non-finite or ended above the pretrained model's. reproduced: {v}'s "
    "band is wider than LoRA's{extra} and it diverges at no more points; not reproduced: its band is narrower "
    "or it diverges at more points; mixed: otherwise.")
RULE_SINGLORA_LR = RULE_LR_BAND.format(v="SingLoRA", extra="")
RULE_DELORA_LR = RULE_LR_BAND.format(v="DeLoRA", extra=", its upper edge is at least LoRA's,")
RULE_LR_MATTERS = (
    "At each variant's own best grid learning rate, held-out accuracy (mean over seeds); spread = best variant's "
    "minus worst variant's, in points. reproduced: spread <= 2 points (the paper's 1-2%); mixed: <= 5 points; "
    "not reproduced: > 5 points.")
RULE_DELORA_LONG = (
    "Long run at a high learning rate; ‖ΔW‖_F over all adapted layers (root of the sum of squares) logged "
    "regularly. growth = ‖ΔW‖ at the end / at 10% of the run; degradation = final held-out loss / lowest logged "
    "held-out loss; both mean over seeds. reproduced: every DeLoRA layer stays within |λ| max_j ‖W[:, j]‖ at "
    "every log and DeLoRA's growth and degradation are both below LoRA's; not reproduced: the bound is broken or "
    "neither is below LoRA's; mixed: otherwise.")
RULE_GRALORA = (
    "Per method and rank, the grid learning rate with the lowest held-out error (mean over seeds). gain(r) = "
    "(error_LoRA - error_GraLoRA) / error_LoRA. reproduced: for both k = 2 and k = 4 the gain at the largest r is "
    "above 1% and above the gain at the smallest r; not reproduced: for neither k is the gain at the largest r "
    "above 1%; mixed: otherwise.")
RULE_SINGLORA_BUDGET = (
    "Square q/k/v/o projections of the LM; per budget k: LoRA r=k, SingLoRA r=k (half the parameters), SingLoRA "
    "r=2k (the same parameters), each at its best grid learning rate (mean held-out loss over seeds). An arm "
    "matches LoRA when its loss is at most 1% above LoRA's. reproduced: SingLoRA r=k matches LoRA r=k at every "
    "k; not reproduced: SingLoRA r=2k matches LoRA r=k at no k; mixed: otherwise.")
RULE_LM_LR = (
    "Every block projection of the LM; per variant the grid learning rate with the lowest mean held-out loss "
    "on the shifted text, each adapter evaluated after ll.save, ll.detach, ll.load. spread = (worst - best) / "
    "best of those losses. reproduced: spread <= 2%; mixed: <= 5%; not reproduced: > 5%.")


@dataclass(frozen=True)
class Scale:
    """Every size the study uses; FULL is the study, QUICK the same code in seconds."""
    seeds: tuple[int, ...]  # experiment 1
    grid_seeds: tuple[int, ...]  # experiments 2-4
    lm_seeds: tuple[int, ...]  # experiments 5-6
    base_steps: int  # digits pretraining (full batch)
    steps: int  # digits adaptation (experiments 1, 2)
    ranks: tuple[int, ...]
    lr: float  # experiment 1, every variant
    lr_grid: tuple[float, ...]
    long_steps: int
    long_lr: float
    long_every: int
    out_d: int
    out_ranks: tuple[int, ...]
    out_steps: int
    out_batch: int
    out_lrs: tuple[float, ...]
    lm_base_steps: int
    lm_steps: int
    lm_r: int
    lm_lrs: tuple[float, ...]
    budgets: tuple[int, ...]


FULL = Scale(seeds=(0, 1, 2, 3, 4), grid_seeds=(0, 1, 2), lm_seeds=(0, 1), base_steps=300, steps=300,
             ranks=(2, 4, 8), lr=3e-3, lr_grid=tuple(10 ** (-4 + i / 4) for i in range(21)), long_steps=3000,
             long_lr=3e-2, long_every=30, out_d=128, out_ranks=(4, 8, 16, 32, 64), out_steps=500, out_batch=256,
             out_lrs=(3e-3, 1e-2, 3e-2), lm_base_steps=600, lm_steps=200, lm_r=8, lm_lrs=(3e-3, 1e-2, 3e-2, 1e-1),
             budgets=(1, 2, 4))
QUICK = Scale(seeds=(0,), grid_seeds=(0,), lm_seeds=(0,), base_steps=30, steps=12, ranks=(2, 4), lr=1e-2,
              lr_grid=(1e-3, 1e-2, 1e-1), long_steps=40, long_lr=3e-2, long_every=10, out_d=32, out_ranks=(4, 8),
              out_steps=10, out_batch=64, out_lrs=(1e-2,), lm_base_steps=5, lm_steps=4, lm_r=4, lm_lrs=(1e-2,),
              budgets=(1, 2))


# ---------------------------------------------------------------- numbers and verdicts

def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs and all(math.isfinite(x) for x in xs) else math.inf


def stats(xs) -> dict:
    """mean, sd, min, max over seeds (mean and sd are inf when any seed diverged) and the values."""
    xs = [float(x) for x in xs]
    m = mean(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)) if math.isfinite(m) else math.inf
    return {"mean": m, "sd": sd, "min": min(xs), "max": max(xs), "seeds": xs}


def three_way(hits: int, n: int) -> str:
    return "reproduced" if hits == n else "not reproduced" if hits == 0 else "mixed"


def band(means: list[float], tol: float = 0.1) -> tuple[int, int, int]:
    """(best, lo, hi): indices of the lowest value and of the contiguous run around it within (1 + tol) x best."""
    best = min(range(len(means)), key=means.__getitem__)
    limit, lo, hi = (1 + tol) * means[best], best, best
    while lo > 0 and means[lo - 1] <= limit:
        lo -= 1
    while hi < len(means) - 1 and means[hi + 1] <= limit:
        hi += 1
    return best, lo, hi


def clean(x):
    """JSON-safe: non-finite floats become null, tuples lists, dict keys strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def entry(name, claim, paper, setup, rule, verdict, numbers, plot) -> dict:
    assert verdict in VERDICTS, verdict
    return {"name": name, "claim": claim, "paper": paper, "setup": setup, "rule": rule, "verdict": verdict,
            "numbers": numbers, "plot": plot}


# ---------------------------------------------------------------- 1. convergence from the same rank (PiSSA)

def pissa_jobs(s: Scale):
    return [(r, v, seed) for r in s.ranks for v in VARIANTS for seed in s.seeds]


def pissa_convergence(s: Scale, run, out: str) -> list[dict]:
    curves: dict = {}
    for r, v, seed in pissa_jobs(s):
        _, losses, _ = run(t.digits_adapt, v, r, s.lr, s.steps, seed, s.base_steps)
        curves.setdefault((r, v), []).append(losses + [math.inf] * (s.steps - len(losses)))
    early = {key: [mean(c[:max(s.steps // 4, 1)]) for c in runs] for key, runs in curves.items()}
    faster = {r: all(p < q for p, q in zip(early[(r, "pissa")], early[(r, "lora")])) for r in s.ranks}
    numbers = {"early_loss": {f"r={r}": {v: stats(early[(r, v)]) for v in VARIANTS} for r in s.ranks},
               "final_loss": {f"r={r}": {v: stats(c[-1] for c in curves[(r, v)]) for v in VARIANTS}
                              for r in s.ranks},
               "pissa_faster": {f"r={r}": faster[r] for r in s.ranks}}
    setup = (f"digits MLP 64-128-10 pretrained on odd digits ({s.base_steps} full-batch steps), adapted on the "
             f"even ones: both layers, r in {list(s.ranks)}, alpha = r, AdamW lr {s.lr}, {s.steps} full-batch "
             f"steps, seeds {list(s.seeds)} (base and adapter)")
    return [entry("pissa_convergence", "PiSSA converges faster than LoRA from the same rank",
                  "PiSSA, arXiv 2404.02948: MNIST toy (MLP pretrained on odd digits, fine-tuned on even)", setup,
                  RULE_PISSA, three_way(sum(faster.values()), len(faster)), numbers,
                  plots.convergence(out, curves, s.ranks, VARIANTS))]


# ---------------------------------------------------------------- 2. learning-rate robustness

def sweep_jobs(s: Scale):
    return [(v, lr, seed) for v in VARIANTS for lr in s.lr_grid for seed in s.grid_seeds]


def sweep_runs(s: Scale, run) -> dict:
    """Per variant: held-out loss and accuracy per grid point and seed, and which points diverged."""
    base = {seed: t.digits_eval(t.digits_base(seed, s.base_steps))[0] for seed in s.grid_seeds}
    res = {v: {"loss": [], "acc": [], "diverged": []} for v in VARIANTS}
    for v, lr, seed in sweep_jobs(s):
        model, losses, _ = run(t.digits_adapt, v, SWEEP_R, lr, s.steps, seed, s.base_steps)
        loss, acc = t.digits_eval(model) if len(losses) == s.steps else (math.inf, 0.0)
        loss = loss if math.isfinite(loss) else math.inf
        if seed == s.grid_seeds[0]:
            for k in res[v]:
                res[v][k].append([])
        res[v]["loss"][-1].append(loss)
        res[v]["acc"][-1].append(acc)
        res[v]["diverged"][-1].append(loss == math.inf or loss > base[seed])
    return res


def sweep_summary(s: Scale, res: dict) -> dict:
    decade = math.log10(s.lr_grid[1] / s.lr_grid[0])
    summary = {}
    for v, r in res.items():
        means = [mean(x) for x in r["loss"]]
        best, lo, hi = band(means)
        summary[v] = {"best_loss": stats(r["loss"][best]), "best_lr": s.lr_grid[best],
                      "best_acc": stats(r["acc"][best]), "band_decades": (hi - lo) * decade,
                      "band_lr": [s.lr_grid[lo], s.lr_grid[hi]], "divergences": sum(map(any, r["diverged"])),
                      "loss_by_lr": means}
    return summary


def band_verdict(summary: dict, v: str, upper_edge: bool) -> str:
    me, lora = summary[v], summary["lora"]
    if me["band_decades"] < lora["band_decades"] or me["divergences"] > lora["divergences"]:
        return "not reproduced"
    wider = me["band_decades"] > lora["band_decades"]
    edge = not upper_edge or me["band_lr"][1] >= lora["band_lr"][1]
    return "reproduced" if wider and edge else "mixed"


def lr_matters_verdict(spread_points: float) -> str:
    return "reproduced" if spread_points <= 2 else "mixed" if spread_points <= 5 else "not reproduced"


def lr_sweep(s: Scale, run, out: str) -> list[dict]:
    res = sweep_runs(s, run)
    summary = sweep_summary(s, res)
    plot = plots.lr_sweep(out, s.lr_grid, {v: list(zip(*res[v]["loss"])) for v in VARIANTS},
                          {v: list(map(any, res[v]["diverged"])) for v in VARIANTS}, "held-out loss (even digits)",
                          "lr_sweep.png")
    grid = f"{len(s.lr_grid)} learning rates {s.lr_grid[0]:.0e}..{s.lr_grid[-1]:.0e} (log-spaced)"
    setup = (f"digits odd->even (as in pissa_convergence), r = {SWEEP_R}, alpha = r, {s.steps} full-batch AdamW "
             f"steps, {grid}, seeds {list(s.grid_seeds)}")
    accs = {v: summary[v]["best_acc"]["mean"] for v in VARIANTS}
    spread = 100 * (max(accs.values()) - min(accs.values()))
    shared = summary["lora"]["best_lr"]
    at_shared = {v: mean(res[v]["acc"][s.lr_grid.index(shared)]) for v in VARIANTS}
    matters = {"best_acc_by_variant": accs, "spread_points": spread, "best_lr_by_variant":
               {v: summary[v]["best_lr"] for v in VARIANTS}, "acc_at_lora_best_lr": at_shared,
               "spread_points_at_lora_best_lr": 100 * (max(at_shared.values()) - min(at_shared.values()))}
    return [
        entry("singlora_lr_robustness", "SingLoRA is stable across learning rates where LoRA is not",
              "SingLoRA, arXiv 2507.05566: learning-rate robustness (accuracy against learning rate)", setup,
              RULE_SINGLORA_LR, band_verdict(summary, "singlora", False), summary, plot),
        entry("delora_lr_robustness", "DeLoRA's bounded update keeps it robust at high learning rates",
              "DeLoRA, arXiv 2503.18225: robustness to the learning rate", setup, RULE_DELORA_LR,
              band_verdict(summary, "delora", True), summary, plot),
        entry("lr_matters_digits", "Once the learning rate is tuned per method, LoRA variants land within 1-2%",
              "Learning Rate Matters, arXiv 2602.04998: tuned peak performance of LoRA variants", setup,
              RULE_LR_MATTERS, lr_matters_verdict(spread), matters, plot)]


# ---------------------------------------------------------------- 3. bounded updates over long training (DeLoRA)

def long_jobs(s: Scale):
    return [(v, seed) for v in VARIANTS for seed in s.grid_seeds]


def long_probe(variant: str):
    def probe(model, step):
        bounds = t.delora_bounds(model) if variant == "delora" else []
        return t.delta_norms(model), bounds, t.digits_eval(model)[0]
    return probe


def total(norms: list[float]) -> float:
    return math.sqrt(sum(n * n for n in norms))


def long_runs(s: Scale, run) -> dict:
    logs = s.long_steps // s.long_every
    res = {v: {"norm": [], "loss": [], "bound": [], "within": True} for v in VARIANTS}
    for v, seed in long_jobs(s):
        _, _, probes = run(t.digits_adapt, v, SWEEP_R, s.long_lr, s.long_steps, seed, s.base_steps,
                           s.long_every, long_probe(v))
        pad = [math.inf] * (logs - len(probes))
        res[v]["norm"].append([total(n) for n, _, _ in probes] + pad)
        res[v]["loss"].append([loss if math.isfinite(loss) else math.inf for _, _, loss in probes] + pad)
        if v == "delora":
            res[v]["bound"].append([total(b) for _, b, _ in probes] + pad)
            res[v]["within"] &= len(probes) == logs and all(
                n <= b * (1 + 1e-5) for ns, bs, _ in probes for n, b in zip(ns, bs))
    return res


def long_summary(s: Scale, res: dict) -> dict:
    tenth = max(len(res["lora"]["norm"][0]) // 10 - 1, 0)
    summary = {}
    for v, r in res.items():
        growth = [n[-1] / n[tenth] if math.isfinite(n[-1]) and n[tenth] > 0 else math.inf for n in r["norm"]]
        degradation = [loss[-1] / min(loss) if math.isfinite(loss[-1]) else math.inf for loss in r["loss"]]
        summary[v] = {"growth": stats(growth), "degradation": stats(degradation),
                      "final_norm": stats(n[-1] for n in r["norm"]), "final_loss": stats(x[-1] for x in r["loss"])}
    summary["delora"]["within_bound"] = res["delora"]["within"]
    summary["delora"]["final_bound"] = stats(b[-1] for b in res["delora"]["bound"])
    return summary


def delora_long(s: Scale, run, out: str) -> list[dict]:
    res = long_runs(s, run)
    summary = long_summary(s, res)
    d, lora = summary["delora"], summary["lora"]
    below = [d[k]["mean"] < lora[k]["mean"] for k in ("growth", "degradation")]
    verdict = ("not reproduced" if not d["within_bound"] or not any(below)
               else "reproduced" if all(below) else "mixed")
    steps = [s.long_every * (i + 1) for i in range(s.long_steps // s.long_every)]
    plot = plots.norms(out, steps, {v: res[v]["norm"] for v in VARIANTS}, {v: res[v]["loss"] for v in VARIANTS},
                       res["delora"]["bound"])
    setup = (f"digits odd->even, r = {SWEEP_R}, alpha = r, DeLoRA lambda0 = {t.LAMBDA0}, AdamW lr {s.long_lr} for "
             f"{s.long_steps} full-batch steps (10x the sweep's), logged every {s.long_every}, "
             f"seeds {list(s.grid_seeds)}")
    return [entry("delora_bounded_update", "DeLoRA bounds ‖ΔW‖, so it stays robust over long training at a high "
                  "learning rate while LoRA's update grows", "DeLoRA, arXiv 2503.18225: robustness to extended "
                  "training", setup, RULE_DELORA_LONG, verdict, summary, plot)]


# ---------------------------------------------------------------- 4. gains with rank (GraLoRA)

ARMS = (("LoRA", "lora", 1), ("GraLoRA k=2", "gralora", 2), ("GraLoRA k=4", "gralora", 4))


def rank_jobs(s: Scale):
    return [(arm, r, lr, seed) for arm in ARMS for r in s.out_ranks for lr in s.out_lrs for seed in s.grid_seeds]


def gralora_rank(s: Scale, run, out: str) -> list[dict]:
    errors: dict = {}
    for (label, v, k), r, lr, seed in rank_jobs(s):
        e = run(t.outlier_adapt, v, r, lr, s.out_steps, seed, s.out_d, s.out_batch, k)
        errors.setdefault((label, r, lr), []).append(e)
    best = {(label, r): min((errors[(label, r, lr)] for lr in s.out_lrs), key=mean)
            for label, _, _ in ARMS for r in s.out_ranks}
    gain = {label: [1 - mean(best[(label, r)]) / mean(best[("LoRA", r)]) for r in s.out_ranks]
            for label, _, _ in ARMS[1:]}
    grows = [g[-1] > MATCH and g[-1] > g[0] for g in gain.values()]
    positive = [g[-1] > MATCH for g in gain.values()]
    verdict = "reproduced" if all(grows) else "not reproduced" if not any(positive) else "mixed"
    floor = [t.outlier_floor(r, s.out_d) for r in s.out_ranks]
    numbers = {"error": {label: {f"r={r}": stats(best[(label, r)]) for r in s.out_ranks} for label, _, _ in ARMS},
               "gain_vs_lora": {label: dict(zip((f"r={r}" for r in s.out_ranks), g)) for label, g in gain.items()},
               "best_rank_r_error": dict(zip((f"r={r}" for r in s.out_ranks), floor))}
    plot = plots.rank_gains(out, s.out_ranks, {label: list(zip(*[best[(label, r)] for r in s.out_ranks]))
                                               for label, _, _ in ARMS}, floor)
    scales = "x" + "/".join(f"{x:.0f}" for x in t.OUTLIER_SCALES)
    setup = (f"one frozen {s.out_d}x{s.out_d} linear layer, known full-rank target update; inputs N(0, 1) with 4 "
             f"channels scaled {scales}; error = E‖(ΔW - ΔW*) x‖² / (the ordinary channels' share), exact from "
             f"delta_weight; r in {list(s.out_ranks)}, alpha = r, {s.out_steps} AdamW steps of {s.out_batch} fresh "
             f"samples, lr from {list(s.out_lrs)} per point, seeds {list(s.grid_seeds)}")
    return [entry("gralora_rank_gains", "GraLoRA's gain over LoRA grows with rank, because input outlier channels "
                  "entangle LoRA's gradient", "GraLoRA, arXiv 2505.20355: rank sweep and the outlier-channel "
                  "gradient analysis", setup, RULE_GRALORA, verdict, numbers, plot)]


# ---------------------------------------------------------------- 5-6. a tiny causal LM pretrained here

SQUARE = (r"\.(q_proj|k_proj|v_proj|o_proj)$",)


def lm_run(cfg, lr, s: Scale, seed: int) -> dict:
    """Adapt, then evaluate the adapter as reloaded from its file (ll.save, ll.detach, ll.load)."""
    model, diverged = t.lm_adapt(cfg, lr, s.lm_steps, seed, s.lm_base_steps)
    params = sum(p.numel() for p in t.trainable(model))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.safetensors")
        ll.save(model, path)
        ll.detach(model)
        ll.load(model, path)
    shift = t.lm_eval(model, "shift_test")
    return {"loss": math.inf if diverged or not math.isfinite(shift) else shift,
            "forgetting": t.lm_eval(model, "pre_test"), "params": params}


def best_lr(runs: dict, lrs) -> float:
    return min(lrs, key=lambda lr: mean(x["loss"] for x in runs[lr]))


def lm_jobs(s: Scale):
    return [(v, lr, seed) for v in VARIANTS for lr in s.lm_lrs for seed in s.lm_seeds]


def lm_setup(s: Scale) -> str:
    return (f"Qwen3 (hidden 64, 2 layers, 4 heads of 16, 4 KV heads, byte vocab 128) pretrained here for "
            f"{s.lm_base_steps} AdamW steps on a word-bigram chain drawn from scripts/text.txt, adapted for "
            f"{s.lm_steps} steps (batch 16 x 64 bytes) to the same chain with every word spelled backwards; "
            f"alpha = r; seeds {list(s.lm_seeds)} (adapter init and batches; one base)")


def lm_lr_matters(s: Scale, run, out: str) -> list[dict]:
    runs: dict = {}
    for v, lr, seed in lm_jobs(s):
        cfg = t.config(v, s.lm_r, s.lm_steps)
        runs.setdefault(v, {}).setdefault(lr, []).append(run(lm_run, cfg, lr, s, seed))
    best = {v: best_lr(runs[v], s.lm_lrs) for v in VARIANTS}
    loss = {v: mean(x["loss"] for x in runs[v][best[v]]) for v in VARIANTS}
    spread = (max(loss.values()) - min(loss.values())) / min(loss.values())
    verdict = "reproduced" if spread <= 0.02 else "mixed" if spread <= 0.05 else "not reproduced"
    base = t.lm_eval(t.lm_base(s.lm_base_steps), "shift_test")
    numbers = {"base_loss_shifted": base, "best_lr": best, "spread": spread,
               "best_loss": {v: stats(x["loss"] for x in runs[v][best[v]]) for v in VARIANTS},
               "loss_by_lr": {v: {f"{lr:g}": mean(x["loss"] for x in runs[v][lr]) for lr in s.lm_lrs}
                              for v in VARIANTS},
               "pretrain_text_loss_after": {v: stats(x["forgetting"] for x in runs[v][best[v]]) for v in VARIANTS},
               "pretrain_text_loss_before": t.lm_eval(t.lm_base(s.lm_base_steps), "pre_test")}
    plot = plots.lr_sweep(out, s.lm_lrs, {v: list(zip(*[[x["loss"] for x in runs[v][lr]] for lr in s.lm_lrs]))
                                          for v in VARIANTS},
                          {v: [any(x["loss"] == math.inf for x in runs[v][lr]) for lr in s.lm_lrs]
                           for v in VARIANTS}, "held-out loss (shifted text)", "lm_lr.png", ylog=False)
    setup = f"{lm_setup(s)}; every block projection (q, k, v, o, gate, up, down), r = {s.lm_r}, lr {list(s.lm_lrs)}"
    return [entry("lr_matters_lm", "Once the learning rate is tuned per method, LoRA variants land within 1-2%",
                  "Learning Rate Matters, arXiv 2602.04998: tuned peak performance of LoRA variants", setup,
                  RULE_LM_LR, verdict, numbers, plot)]


ARM_KINDS = (("LoRA r=k", "lora", 1), ("SingLoRA r=k", "singlora", 1), ("SingLoRA r=2k", "singlora", 2))


def budget_configs(s: Scale) -> list[tuple[str, int]]:
    """(variant, r) of every arm, each once: SingLoRA r=2k of one budget is SingLoRA r=k of the next."""
    return sorted({(v, m * k) for k in s.budgets for _, v, m in ARM_KINDS})


def budget_jobs(s: Scale):
    return [(v, r, lr, seed) for v, r in budget_configs(s) for lr in s.lm_lrs for seed in s.lm_seeds]


def budget_verdict(s: Scale, loss: dict) -> tuple[str, dict]:
    """loss[(kind, k)]: the arm's best mean held-out loss."""
    half = {k: loss[("SingLoRA r=k", k)] <= (1 + MATCH) * loss[("LoRA r=k", k)] for k in s.budgets}
    equal = {k: loss[("SingLoRA r=2k", k)] <= (1 + MATCH) * loss[("LoRA r=k", k)] for k in s.budgets}
    verdict = "reproduced" if all(half.values()) else "not reproduced" if not any(equal.values()) else "mixed"
    return verdict, {"half_budget_matches": half, "equal_budget_matches": equal}


def singlora_budget(s: Scale, run, out: str) -> list[dict]:
    runs: dict = {}
    for v, r, lr, seed in budget_jobs(s):
        cfg = t.config(v, r, s.lm_steps, target_names=SQUARE)
        runs.setdefault((v, r), {}).setdefault(lr, []).append(run(lm_run, cfg, lr, s, seed))
    arm = {(kind, k): (v, m * k) for k in s.budgets for kind, v, m in ARM_KINDS}
    best = {key: runs[c][best_lr(runs[c], s.lm_lrs)] for key, c in arm.items()}  # the seeds at the best lr
    verdict, matches = budget_verdict(s, {key: mean(x["loss"] for x in b) for key, b in best.items()})
    numbers = {"arms": {f"{kind}, k={k}": {"params": best[(kind, k)][0]["params"],
                                           "best_lr": best_lr(runs[arm[(kind, k)]], s.lm_lrs),
                                           "loss": stats(x["loss"] for x in best[(kind, k)])} for kind, k in arm},
               **matches}
    arms = {kind: ([best[(kind, k)][0]["params"] for k in s.budgets],
                   list(zip(*[[x["loss"] for x in best[(kind, k)]] for k in s.budgets]))) for kind, _, _ in ARM_KINDS}
    setup = f"{lm_setup(s)}; q, k, v, o of both blocks (all 64x64), budgets k in {list(s.budgets)}, lr {list(s.lm_lrs)}"
    return [entry("singlora_param_efficiency", "SingLoRA needs about half LoRA's parameters",
                  "SingLoRA, arXiv 2507.05566: accuracy at about 60% of LoRA's parameter budget", setup,
                  RULE_SINGLORA_BUDGET, verdict, numbers, plots.budget(out, arms))]


# ---------------------------------------------------------------- the run

EXPERIMENTS = ((pissa_jobs, pissa_convergence), (sweep_jobs, lr_sweep), (long_jobs, delora_long),
               (rank_jobs, gralora_rank), (lm_jobs, lm_lr_matters), (budget_jobs, singlora_budget))


def report(e: dict) -> str:
    return (f"[{e['verdict']}] {e['name']}: {e['claim']}\n  setup: {e['setup']}\n  rule: {e['rule']}\n"
            f"  plot: {e['plot']}")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/study", help="folder for study.json and the PNGs")
    p.add_argument("--quick", action="store_true", help="tiny settings, seconds: checks the script, proves nothing")
    return p.parse_args(argv)


def run_all(s: Scale, out: str) -> list[dict]:
    results = []
    with tqdm(total=sum(len(jobs(s)) for jobs, _ in EXPERIMENTS), desc="study", unit="run", file=sys.stderr) as bar:
        def run(fn, *args):
            value = fn(*args)
            bar.update()
            return value

        for _, experiment in EXPERIMENTS:
            bar.set_postfix_str(experiment.__name__)
            for e in experiment(s, run, out):
                results.append(clean(e))
                tqdm.write(report(e))
    return results


def main(argv=None) -> int:
    a = parse(argv)
    s = QUICK if a.quick else FULL
    os.makedirs(a.out, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        results = run_all(s, a.out)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a test session
    with open(os.path.join(a.out, "study.json"), "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    print("\n".join(f"{e['verdict']:>15}  {e['name']}" for e in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
