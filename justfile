# lora-lite recipes. `just --list` shows them.
export HF_HUB_OFFLINE := "1"
export TRANSFORMERS_OFFLINE := "1"

# the whole test suite (a few minutes on 2 CPU cores)
test *ARGS:
    python -m pytest {{ARGS}}

# train, save and reload every variant on a small real transformers model (seconds each)
smoke *ARGS:
    python scripts/smoke.py {{ARGS}}

# every variant on a real Qwen3 architecture: targets, identity, loss drop, reload error
qwen-probe *ARGS:
    python scripts/qwen_probe.py {{ARGS}}

# every variant on bitsandbytes 4-bit (nf4, fp4) and 8-bit bases, on the CPU
bnb-smoke *ARGS:
    python scripts/bnb_smoke.py {{ARGS}}

# rerun the `matrix` tests and rewrite the README's support matrix from their results (--check: fail if stale)
support-matrix *ARGS:
    python scripts/support_matrix.py {{ARGS}}

# speed and memory against the frozen base and the reference implementations
bench *ARGS:
    python scripts/bench.py {{ARGS}}

# each variant's paper claim tested at CPU scale: verdicts, numbers and plots in results/study (docs/study.md)
study *ARGS:
    python scripts/study.py --out results/study {{ARGS}}

# export every variant as a PEFT adapter folder (both forms), load it with PEFT, print the errors (exit 1 over 1e-5)
peft-roundtrip *ARGS:
    python scripts/peft_roundtrip.py {{ARGS}}
