"""`scripts/bench.py --quick` runs every registered variant against its reference and writes its results.

No timing assertions: only that every measurement was taken and written.
"""
import importlib.util
import json
import math
import os

import lora_lite as ll

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "bench.py")


def test_quick_bench_writes_json_and_chart(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--compile-backend", "aot_eager", "--out", str(tmp_path)])

    data = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert sorted(data["results"]) == sorted(ll.REGISTRY)
    assert data["setup"]["quick"] and data["machine"]["peft"]
    for name, r in data["results"].items():
        medians = [v for part in r["median"].values() for v in part.values()]
        assert medians and all(math.isfinite(v) and v > 0 for v in medians), name
        assert set(r["train_s"]) == {"base", "ours", "ref"} and all(len(v) == 2 for v in r["train_s"].values())
        assert set(r["inference_s"]) == {"base", "hooked", "merged", "ref_hooked"}
        assert all(b > 0 for b in r["peak_bytes"].values()), name
        assert 0 < r["ratios"]["flop_floor"] < 1, name
        assert r["floors"]["memory_s"]["train"] > r["floors"]["memory_s"]["inference"] > 0, name
        assert set(r["compiled"]["median"]["train"]) == {"base", "ours", "ref"}, name
        assert set(r["hot_path"]) == {"base", "ours", "ref", "floor_bytes"}, name
    assert set(data["results"]["pissa"]["attach_s"]) == {"ours_svd", "ours_niter4", "ref_pissa", "ref_pissa_niter_4"}
    assert any(t["target"].startswith("lora train overhead") for t in data["targets"])
    assert sorted(data["sweep"], key=int) == ["32", "64"] and data["machine"]["bandwidth_bytes_per_s"] > 0
    assert {(x["d"], x["r"]) for x in data["layouts"]} == {(d, r) for d in (64, 192) for r in (4, 8, 12, 16, 32)}
    assert all(x["rank_left_s"] > 0 and x["rank_right_s"] > 0 for x in data["layouts"])
    out = capsys.readouterr().out
    assert "Train step" in out and "Targets:" in out


def test_device_options_parse_and_pick_the_clock():
    """Without a GPU: --device/--dtype parse, the clock follows the device, cuda is refused with its reason."""
    import pytest

    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import bench_measure

    a = bench.parse(["--quick", "--dtype", "bfloat16"])
    assert a.device == "cpu" and a.dtype == "bfloat16"
    assert isinstance(bench_measure.clock_for("cpu"), bench_measure.HostClock)
    assert isinstance(bench_measure.clock_for("cuda:0"), bench_measure.CudaClock)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse(["--device", "cuda", "--dtype", "bfloat16"])
