"""The command-line checks (`just qwen-probe`, `just smoke`) run in-process with short settings."""
from __future__ import annotations

import json
import os
import sys

import lora_lite as ll

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import qwen_probe  # noqa: E402
import smoke  # noqa: E402

TYPES = {"variant": str, "targets": list, "trainable": int, "identity_err": float, "perturb_delta": float,
         "loss0": float, "lossN": float, "drop_pct": float, "grad_norm": float, "adapter_delta": float,
         "reload_err": float}


def test_qwen_probe_json(tmp_path, capsys):
    path = tmp_path / "probe.json"
    assert qwen_probe.main(["--steps", "5", "--batch", "2", "--seq", "32", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert [r["variant"] for r in rows] == sorted(ll.REGISTRY)
    for row in rows:
        assert list(row) == list(TYPES)
        assert all(isinstance(row[k], t) for k, t in TYPES.items()), row
        assert row["targets"] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
        assert row["trainable"] > 0 and row["identity_err"] <= 1e-6 and row["perturb_delta"] > 0
        assert row["reload_err"] <= 1e-5 and row["lossN"] < row["loss0"] and row["adapter_delta"] > 0
    table = capsys.readouterr().out
    assert all(name in table for name in ll.REGISTRY) and "FAIL" not in table


def test_smoke(capsys):
    assert smoke.main(["--steps", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "OK"
    assert len(lines) == len(ll.REGISTRY) + 2 and all(line.endswith(" ok") for line in lines[1:-1])
