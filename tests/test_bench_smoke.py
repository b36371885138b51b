"""Smoke test of scripts/bench.py: tiny sizes, one repeat, every timing suite, JSON keys."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_script", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_quick_writes_json(tmp_path):
    bench = _load()
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--repeats", "1", "--warmup", "0", "--threads", "1", "--profile", "never",
                "--only", "slice_step,ensemble_step,shared_prefix", "--out", str(out)])
    res = json.loads(out.read_text())
    for key in ("torch", "device", "threads", "date", "config", "git", "repeats", "warmup", "suites", "targets"):
        assert key in res
    want = {
        "slice_step": ({"full_K1", "filters0.1_K1"}, {"slice_over_full"}),
        "ensemble_step": ({"vmap", "loop", "vmap_channels_last", "loop_channels_last", "full_plain_x1"},
                          {"loop_over_vmap", "vmap_over_8x_full"}),
        "shared_prefix": ({"head_K8", "block3_K8", "full_plain_x1"}, {"head_K8_over_full", "block3_K8_over_full"}),
    }
    for suite, (cases, ratios) in want.items():
        body = res["suites"][suite]
        assert set(body["cases"]) == cases
        assert ratios <= set(body["ratios"])
        for c in body["cases"].values():
            assert c["median_s"] > 0 and len(c["all_s"]) == 1
        for r in body["ratios"].values():
            assert r["value"] > 0
    assert res["targets"]["total"] == 7


def test_bench_rejects_unknown_suite():
    bench = _load()
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "nope"])
