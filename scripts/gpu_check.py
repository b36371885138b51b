#!/usr/bin/env python
"""One command that checks the library on a CUDA machine and writes JSON: tests, benchmarks, a real run.

    python scripts/gpu_check.py --out results/gpu_check            # on a machine with CUDA, < 8 minutes
    python scripts/gpu_check.py --quick --device cpu --out /tmp/gc  # the same stages at toy sizes (CI)

Stages, each a subprocess with its own time limit, each writing into ``--out``:
  tests        ``pytest tests/test_ops.py --device DEV``: every custom op and every conv execution
               strategy against plain modules, on the device; then the default suite (``-m "not slow"``)
  bench        ``scripts/bench.py --device DEV``: K=8 vmap vs member loop vs 8 x one full model,
               the K=1 slice step, shared prefixes, memory, LC-ResNet, mixed adapter batches
  distributed  ``scripts/bench.py --only distributed --processes N`` over all N visible GPUs
               (member- and data-parallel vs one process); skipped with fewer than 2 GPUs
  train        ``scripts/train_ensemble.py``: K=8 members, one epoch of Fashion-MNIST (the 8x8
               digits where Fashion-MNIST is not installed), vmapped

``gpu_check.json`` sums up each stage (exit code, seconds, its JSON) and the GPU targets:
a K=8 vmap step <= 2.5 x one model's step, vmap >= 3 x the member loop, member-parallel on N GPUs
>= 0.8 N x one GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# seconds per stage; the full run stays under 8 minutes together
LIMITS = {"tests": 150, "bench": 170, "distributed": 80, "train": 70}


def _run(cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"cmd": cmd, "rc": rc, "ok": rc == 0, "wall_s": round(time.perf_counter() - t0, 1), "log": log.name}


def _tail(path: Path, n: int = 3) -> list[str]:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return lines[-n:]


def gpu_count(device: str) -> int:
    import torch

    return torch.cuda.device_count() if device == "cuda" else 0


def stage_tests(args, out: Path) -> dict:
    py = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--device", args.device]
    if args.quick:  # the setting, and one strategy of the ensemble contract
        ops = _run(py + ["-x", "tests/test_ops.py", "-k", "setting or equals_plain and grouped and filters+bn+head-shared"],
                   LIMITS["tests"], out / "tests_ops.log")
        ops["summary"] = _tail(out / "tests_ops.log", 1)
        return {"ops": ops}
    ops = _run(py + ["tests/test_ops.py", "--junitxml", str(out / "tests_ops.xml")], 60, out / "tests_ops.log")
    ops["summary"] = _tail(out / "tests_ops.log", 1)
    left = LIMITS["tests"] - ops["wall_s"]
    suite = _run(py + ["-x", "-m", "not slow", "tests", "--deselect", "tests/test_ops.py"], max(left, 10),
                 out / "tests_suite.log")
    suite["summary"] = _tail(out / "tests_suite.log", 1)
    return {"ops": ops, "suite": suite}


def stage_bench(args, out: Path) -> dict:
    dest = out / "bench.json"
    cmd = [sys.executable, "scripts/bench.py", "--device", args.device, "--profile", "never", "--lc-memory", "off",
           "--out", str(dest)]
    if args.quick:
        cmd += ["--only", "ensemble_step", "--quick", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    else:
        cmd += ["--only", "slice_step,ensemble_step,shared_prefix,memory,lc,adapters", "--repeats", "5"]
    res = _run(cmd, LIMITS["bench"], out / "bench.log")
    res["json"] = dest.name if dest.is_file() else None
    return res


def stage_distributed(args, out: Path) -> dict:
    n = gpu_count(args.device)
    if args.quick:
        return {"ok": None, "skipped": "--quick starts no multi-process launch"}
    if n < 2:
        return {"ok": None, "skipped": f"{n} GPU(s) visible; member- and data-parallel need at least 2"}
    dest = out / "bench_distributed.json"
    cmd = [sys.executable, "scripts/bench.py", "--only", "distributed", "--device", args.device,
           "--processes", str(n), "--repeats", "2", "--out", str(dest)]
    res = _run(cmd, LIMITS["distributed"], out / "distributed.log")
    res["json"] = dest.name if dest.is_file() else None
    return res


def stage_train(args, out: Path) -> dict:
    task = "fashion_mnist" if FASHION_DIR.is_dir() and not args.quick else "digits"
    run_dir = out / "train"
    cmd = [sys.executable, "scripts/train_ensemble.py", "--task", task, "--ood", "none", "--no-progress",
           "--execution", "vmap", "--out", str(run_dir), "--precise-bn", "0"]
    if args.quick:
        cmd += ["--members", "2", "--epochs", "1", "--train-subset", "64", "--test-subset", "64", "--width", "4",
                "--batch-size", "32", "--threads", "1"]
    else:
        cmd += ["--members", "8", "--epochs", "1", "--train-subset", "20000", "--test-subset", "5000"]
    env = {} if args.device == "cuda" else {"CUDA_VISIBLE_DEVICES": ""}
    res = _run(cmd, LIMITS["train"], out / "train.log", env)
    results = run_dir / "results.json"
    if results.is_file():
        rep = json.loads(results.read_text())
        res["task"] = task
        res["accuracy"] = rep.get("metrics", {}).get("accuracy")
        res["train_seconds"] = rep.get("train", {}).get("train_seconds")
        res["execution"] = rep.get("execution")
        (out / "train_results.json").write_text(json.dumps(rep, indent=1, default=str))
    return res


def targets(out: Path) -> dict:
    """The GPU targets from the bench JSON (met: None where the measure is missing)."""
    res: dict = {}
    bench = out / "bench.json"
    if bench.is_file():
        cases = json.loads(bench.read_text())["suites"].get("ensemble_step", {}).get("cases", {})
        if {"vmap", "loop", "full_plain_x1"} <= set(cases):
            vmap, loop, one = (cases[c]["median_s"] for c in ("vmap", "loop", "full_plain_x1"))
            res["k8_vmap_over_one_model"] = {"value": vmap / one, "target": "<= 2.5", "met": vmap / one <= 2.5}
            res["loop_over_vmap"] = {"value": loop / vmap, "target": ">= 3", "met": loop / vmap >= 3}
    dist = out / "bench_distributed.json"
    if dist.is_file():
        body = json.loads(dist.read_text())["suites"]["distributed"]
        for name, r in body["ratios"].items():
            if name.startswith("one_over_") and name.endswith("proc_members"):
                n = int(name[len("one_over_"):].split("proc")[0])
                res[f"member_parallel_{n}gpu_speedup"] = {"value": r["value"], "target": f">= {0.8 * n:.1f}",
                                                          "met": r["value"] >= 0.8 * n}
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, the stages' JSON and logs")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="toy sizes and a test subset (CI runs this on CPU)")
    ap.add_argument("--stages", default="tests,bench,distributed,train",
                    help="comma-separated subset of tests, bench, distributed, train")
    args = ap.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    known = {"tests": stage_tests, "bench": stage_bench, "distributed": stage_distributed, "train": stage_train}
    bad = [s for s in stages if s not in known]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {', '.join(known)}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda, but torch.cuda.is_available() is False (use --device cpu)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if "distributed" in stages and gpu_count(args.device) < 2:  # skipped: its time goes to the test suite
        LIMITS["tests"] += LIMITS["distributed"]

    report: dict = {"device": args.device, "quick": args.quick, "torch": torch.__version__,
                    "gpus": [torch.cuda.get_device_name(i) for i in range(gpu_count(args.device))],
                    "stages": {}}
    t0 = time.perf_counter()
    for s in stages:
        print(f"gpu_check: {s} ...", flush=True)
        report["stages"][s] = known[s](args, out)
        print(f"gpu_check: {s}: {json.dumps({k: v for k, v in report['stages'][s].items() if k != 'cmd'})[:300]}",
              flush=True)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["targets"] = targets(out)
    report["ok"] = all(_stage_ok(v) for v in report["stages"].values())
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"gpu_check: {'ok' if report['ok'] else 'FAILED'} in {report['wall_s']} s -> {out / 'gpu_check.json'}")
    return report


def _stage_ok(body: dict) -> bool:
    if "ok" in body:
        return body["ok"] is not False
    return all(v.get("ok") is not False for v in body.values() if isinstance(v, dict))


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
