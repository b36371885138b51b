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
        "slice_step": ({"full_K1", "filters0.1_K1", "filters0.1_bn_head_K1", "full_plain_x1"},
                       {"slice_over_full", "k1_slice_bn_head_over_full_step"}),
        "ensemble_step": ({"vmap", "loop", "naive_loop", "full_plain_x1"},
                          {"naive_loop_over_vmap", "loop_over_vmap", "vmap_over_8x_full", "k8_auto_over_8x_full",
                           "vmap_speed_over_loop"}),
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
    assert res["targets"]["total"] == 8
    assert set(res["headline"]) == {"k1_slice_bn_head_over_full_step", "k8_auto_over_8x_full_step",
                                    "vmap_speed_over_loop_k8"}
    auto = res["suites"]["ensemble_step"]["ratios"]["k8_auto_over_8x_full"]
    assert auto["definition"].startswith("loop" if res["device"] == "cpu" else "vmap")


def test_bench_rejects_unknown_suite():
    bench = _load()
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "nope"])


def test_bench_lc_quick_suite(tmp_path):
    """The lc suite (issue 4) at tiny sizes: fused/unfused LC steps, their ratios, a memory case in-process."""
    bench = _load()
    out = tmp_path / "bench_lc.json"
    bench.main(["--quick", "--repeats", "1", "--warmup", "0", "--threads", "1", "--only", "lc",
                "--lc-memory", "off", "--out", str(out)])
    body = json.loads(out.read_text())["suites"]["lc"]
    es = body["config"]["expansions"]
    assert set(body["cases"]) >= {f"fused_E{e}" for e in es} | {"plain_resnet20", "plain_resnet20_paper_setting",
                                                                 f"fused_E{max(es)}_paper_setting"}
    assert {f"unfused_over_fused_E{e}" for e in es} | {f"fused_E{max(es)}_over_plain_resnet20",
                                                       f"fused_E{max(es)}_over_plain_resnet20_paper_setting"} \
        <= set(body["ratios"])
    assert all(r["value"] > 0 for r in body["ratios"].values())
    cfg = bench.make_config(bench.parse_args(["--quick"]))
    b = bench.Bench(cfg, bench.torch.device("cpu"))
    bench.lc_step_from_name(b, f"lc_unfused_E{es[0]}")()  # what a memory subprocess runs
    assert bench.lc_batch({**cfg, "batch": 128, "image": 28}, 128) < 128  # x128 unfused would not fit the cap
