"""`scripts/study.py --quick` writes one verdict per claim, with its rule, numbers and plot, reproducibly.

The quick settings prove nothing about the papers; these tests check the study's machinery: the JSON
schema, that every verdict comes from the allowed set by the rule stored beside it, that a rerun in a
fresh process gives the same numbers, and the decision helpers on hand-made numbers.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
NAMES = ["pissa_convergence", "singlora_lr_robustness", "delora_lr_robustness", "lr_matters_digits",
         "delora_bounded_update", "gralora_rank_gains", "lr_matters_lm", "singlora_param_efficiency"]
KEYS = {"name": str, "claim": str, "paper": str, "setup": str, "rule": str, "verdict": str, "numbers": dict,
        "plot": str}


def load_study():
    sys.path.insert(0, SCRIPTS)
    spec = importlib.util.spec_from_file_location("study", os.path.join(SCRIPTS, "study.py"))
    study = importlib.util.module_from_spec(spec)
    sys.modules["study"] = study  # dataclasses look their module up while the class is built
    spec.loader.exec_module(study)
    return study


@pytest.fixture(scope="module")
def study():
    return load_study()


@pytest.fixture(scope="module")
def quick(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert study.main(["--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "study.json").read_text())


def test_quick_writes_every_claim_with_rule_and_verdict(study, quick, capsys):
    out, results = quick
    assert [e["name"] for e in results] == NAMES
    rules = {v for k, v in vars(study).items() if k.startswith("RULE_") and isinstance(v, str)}
    for e in results:
        assert set(e) == set(KEYS) and all(isinstance(e[k], t) for k, t in KEYS.items()), e["name"]
        assert e["verdict"] in ("reproduced", "not reproduced", "mixed"), e["name"]
        assert e["rule"] in rules and e["numbers"], e["name"]
        assert (out / e["plot"]).stat().st_size > 1000, e["plot"]


def test_quick_numbers_hold_the_invariants(quick):
    by_name = {e["name"]: e["numbers"] for e in quick[1]}
    assert by_name["delora_bounded_update"]["delora"]["within_bound"] is True  # ‖ΔW‖ <= |λ| max ‖W[:, j]‖
    arms = by_name["singlora_param_efficiency"]["arms"]
    for k in (1, 2):  # SingLoRA r=2k on square layers has exactly LoRA r=k's parameters; r=k half of them
        lora = arms[f"LoRA r=k, k={k}"]["params"]
        assert arms[f"SingLoRA r=2k, k={k}"]["params"] == lora == 2 * arms[f"SingLoRA r=k, k={k}"]["params"]
    sweep = by_name["singlora_lr_robustness"]
    assert sorted(sweep) == sorted(["delora", "gralora", "lora", "pissa", "singlora"])


def test_quick_rerun_in_a_fresh_process_gives_the_same_json(quick, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(SCRIPTS), "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, "study.py"), "--quick", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "study.json").read_text()) == quick[1]
    assert all(f"rule: {e['rule']}" in proc.stdout for e in quick[1])  # each rule is printed with its result
    assert "study" in proc.stderr  # the progress bar


def test_band_is_the_contiguous_run_within_ten_percent(study):
    assert study.band([5.0, 1.05, 1.0, 1.09, 3.0]) == (2, 1, 3)
    assert study.band([1.0, 1.2, 1.05]) == (0, 0, 0)  # 1.05 is within 10% but not contiguous with the best
    assert study.band([float("inf"), 2.0, float("inf")]) == (1, 1, 1)


def test_verdict_helpers(study):
    assert [study.three_way(h, 3) for h in (3, 1, 0)] == ["reproduced", "mixed", "not reproduced"]
    lora = {"band_decades": 0.5, "band_lr": [1e-3, 3e-3], "divergences": 2}
    wide = {"band_decades": 1.0, "band_lr": [1e-3, 1e-2], "divergences": 2}
    low = {"band_decades": 1.0, "band_lr": [1e-4, 1e-3], "divergences": 1}
    assert study.band_verdict({"lora": lora, "x": wide}, "x", upper_edge=True) == "reproduced"
    assert study.band_verdict({"lora": lora, "x": low}, "x", upper_edge=True) == "mixed"  # wider, lower edge
    assert study.band_verdict({"lora": lora, "x": low}, "x", upper_edge=False) == "reproduced"
    assert study.band_verdict({"lora": lora, "x": {**wide, "divergences": 3}}, "x", False) == "not reproduced"
    assert [study.lr_matters_verdict(p) for p in (1.5, 4.0, 6.0)] == ["reproduced", "mixed", "not reproduced"]
