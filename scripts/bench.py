#!/usr/bin/env python
"""Training-step benchmarks for shared_backbone (issues 2 and 3), as ratios measured in one run.

Every suite builds its cases, then times them interleaved: in each repeat every case runs one
training step (forward + cross-entropy over the ``(K, N, C)`` logits times K + backward + SGD
Nesterov step, as in ``shared_backbone.train.fit``), the order rotating from repeat to repeat.
Each case reports the median seconds per step over the repeats (after ``--warmup`` untimed
rounds); each ratio is reported both as a ratio of medians and as the median of the per-repeat
ratios (paired within one repeat, so a burst of load from other work hits both sides).

Suites (``--only``):
  slice_step     one step of ResNet-20 w16 (1x28x28, batch 128): Full() vs Filters(0.1), K=1 each
  ensemble_step  K=8 members of Filters(0.1)+BatchNorm()+Head(): vmapped vs a naive loop over 8
                 separate plain modules (full weight gradients, fixed rows masked by hooks) vs
                 this library's own loop (``forward(x, vectorized=False)``) vs 8 x one plain
                 fully trained model's step
  shared_prefix  Head()-only and Blocks("block3") ensembles of 8 vs one full model step
  memory         peak memory of one training step (one subprocess per case) and bytes stored
                 per member (``describe``) vs one full model; K=8 all at once and in member groups
                 of 4, 2 and 1 (``TrainConfig.member_group_size``: one backward per group)
  lc             LCResNet-20-16xE (E = 8, 32, 128; spatial frozen, plain module + SGD): fused vs
                 unfused LC-Blocks, fused x128 vs a plain ResNet-20-16 step (also at the paper's
                 CIFAR-10 shapes: 3x32x32, batch 256); peak memory of each (but the latter two)
  distributed    K=8 members trained by fit() in 1 process vs 2 (accelerate launch), member-parallel
                 vs data-parallel, fresh processes, the cores split evenly between processes
  adapters       serving (eval forward, no grad): one mixed batch of 4 tasks through AdapterBank
                 (one vmapped call) vs 4 separate per-task forwards on the same samples; bytes on
                 disk per task adapter vs one full model

Usage:
  .venv/bin/python scripts/bench.py --out results/bench.json
  .venv/bin/python scripts/bench.py --quick --only slice_step,memory --repeats 2
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared_backbone import (  # noqa: E402
    BatchNorm, Blocks, Ensemble, Filters, FrozenBackbone, Full, Head, build_backbone, describe,
)
from shared_backbone._member_groups import auto_group_size, forward_in_groups  # noqa: E402
from shared_backbone.io import write_json  # noqa: E402

SUITES = ("slice_step", "ensemble_step", "shared_prefix", "memory", "lc", "adapters", "distributed")
ENSEMBLE_SPEC = "Filters(0.1)+BatchNorm()+Head()"

# recipe of fit(): SGD Nesterov, weight decay, label smoothing
LR, MOMENTUM, WD, SMOOTH = 0.05, 0.9, 5e-4, 0.1


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
def make_config(args) -> dict:
    if args.quick:
        cfg = {"arch": "resnet20", "width": 16, "in_channels": 1, "num_classes": 10,
               "batch": 4, "image": 8, "members": 2}
    else:
        cfg = {"arch": "resnet20", "width": 16, "in_channels": 1, "num_classes": 10,
               "batch": 128, "image": 28, "members": 8}
    cfg.update({"ensemble_spec": ENSEMBLE_SPEC, "optimizer": "SGD(lr=0.05, momentum=0.9, nesterov, wd=5e-4)",
                "loss": "cross_entropy(label_smoothing=0.1) over (K*N, C) logits * K",
                "seed": 0, "quick": bool(args.quick)})
    return cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    """Shared state of one run: the frozen backbone and one fixed batch."""

    def __init__(self, cfg: dict, device: torch.device):
        self.cfg, self.device = cfg, device
        bb = build_backbone(cfg["arch"], in_channels=cfg["in_channels"], width=cfg["width"],
                            num_classes=cfg["num_classes"])
        self.frozen = FrozenBackbone(bb, seed=cfg["seed"])
        g = torch.Generator().manual_seed(cfg["seed"])
        n, s = cfg["batch"], cfg["image"]
        self.x = torch.randn(n, cfg["in_channels"], s, s, generator=g).to(device)
        self.y = torch.randint(0, cfg["num_classes"], (n,), generator=g).to(device)
        self.x_cl = self.x.contiguous(memory_format=torch.channels_last)

    # -- step closures -------------------------------------------------------------------------
    def _sgd(self, params) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in params if p.requires_grad], lr=LR, momentum=MOMENTUM,
                               nesterov=True, weight_decay=WD)

    def ensemble_case(self, spec, members: int, *, vectorized: bool = True, channels_last: bool = False,
                      group_size: int | None = None) -> tuple[Callable[[], None], torch.nn.Module]:
        ens = Ensemble(self.frozen, spec, members=members, seed=0, vectorized=vectorized).to(self.device).train()
        opt = self._sgd(ens.parameters())
        x, y = (self.x_cl if channels_last else self.x), self.y

        def step() -> None:
            logits = ens(x, vectorized=vectorized)  # (K, N, C)
            k = logits.shape[0]
            loss = F.cross_entropy(logits.flatten(0, 1), y.expand(k, -1).flatten(),
                                   label_smoothing=SMOOTH) * k
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def grouped_step() -> None:  # fit() with TrainConfig.member_group_size: one backward per member group
            opt.zero_grad(set_to_none=True)
            for _, logits in forward_in_groups(ens, x, group_size):  # (G, N, C)
                g = logits.shape[0]
                (F.cross_entropy(logits.flatten(0, 1), y.expand(g, -1).flatten(), label_smoothing=SMOOTH) * g).backward()
            opt.step()

        return (step if group_size is None else grouped_step), ens

    def plain_case(self, *, channels_last: bool = False) -> tuple[Callable[[], None], torch.nn.Module]:
        """One plain backbone, every parameter learnable (a fully trained model's step)."""
        cfg = self.cfg
        model = build_backbone(cfg["arch"], in_channels=cfg["in_channels"], width=cfg["width"],
                               num_classes=cfg["num_classes"]).to(self.device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = self._sgd(model.parameters())
        x, y = (self.x_cl if channels_last else self.x), self.y
        return _plain_step(model, opt, x, y), model


def _naive_loop_case(self, spec, members: int) -> Callable[[], None]:
    """What a user writes without this library: K separate plain modules, every weight requiring
    a gradient, the fixed filters' gradients zeroed by hooks (the partial-learning paper's way)."""
    from shared_backbone.slices import resolve

    layout = resolve(spec, self.frozen.backbone)
    ens = Ensemble(self.frozen, spec, members=members, seed=0)
    models = [ens.member(i).to(self.device).train() for i in range(members)]
    params = []
    for m in models:
        for name, p in m.named_parameters():
            sl = layout.get(name)
            p.requires_grad_(sl is not None)
            if sl is not None and not sl.whole:
                mask = torch.zeros_like(p)
                mask.narrow(sl.dim, 0, sl.n).fill_(1)
                p.register_hook(lambda g, mask=mask: g * mask)
            if p.requires_grad:
                params.append(p)
    opt = self._sgd(params)
    x, y = self.x, self.y

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for m in models:
            F.cross_entropy(m(x), y, label_smoothing=SMOOTH).backward()
        opt.step()

    return step


Bench.naive_loop_case = _naive_loop_case


def suite_cases(bench: Bench, suite: str) -> dict[str, Callable[[], None]]:
    if suite == "lc":
        return lc_cases(bench)
    k = bench.cfg["members"]
    ens_spec = Filters(0.1) + BatchNorm() + Head()
    if suite == "slice_step":
        return {
            "full_K1": bench.ensemble_case(Full(), 1)[0],
            "filters0.1_K1": bench.ensemble_case(Filters(0.1), 1)[0],
            "filters0.1_bn_head_K1": bench.ensemble_case(ens_spec, 1)[0],
            "full_plain_x1": bench.plain_case()[0],
        }
    if suite == "ensemble_step":
        return {
            "vmap": bench.ensemble_case(ens_spec, k)[0],
            "loop": bench.ensemble_case(ens_spec, k, vectorized=False)[0],
            "full_plain_x1": bench.plain_case()[0],
            "naive_loop": bench.naive_loop_case(ens_spec, k),
        }
    if suite == "shared_prefix":
        return {
            "head_K8": bench.ensemble_case(Head(), k)[0],
            "block3_K8": bench.ensemble_case(Blocks("block3"), k)[0],
            "full_plain_x1": bench.plain_case()[0],
        }
    if suite == "adapters":
        return adapter_cases(bench)
    raise ValueError(suite)


ADAPTER_TASKS = (("a", 10), ("b", 10), ("c", 4), ("d", 10))  # (name, classes): 4 tasks, one spec


def _adapter_bank(bench: Bench, spec=None):
    from shared_backbone import AdapterBank

    bank = AdapterBank(bench.frozen)
    for i, (name, classes) in enumerate(ADAPTER_TASKS):
        bank.add_task(name, spec or Filters(0.1) + BatchNorm() + Head(), num_classes=classes, seed=i)
    return bank.to(bench.device).eval()


def adapter_cases(bench: Bench) -> dict[str, Callable[[], None]]:
    """Serving: a mixed batch of 4 tasks in one vmapped call vs 4 per-task forwards on the same samples,
    for ``Filters(0.1)+BatchNorm()+Head()`` tasks and for ``Blocks("block3")+Head()`` tasks (whose
    stem, block1 and block2 run once for the whole mixed batch)."""
    names = [t for t, _ in ADAPTER_TASKS]
    n = bench.x.shape[0]
    tasks = [names[i % len(names)] for i in range(n)]  # interleaved: every task in every batch
    index = {t: torch.tensor([i for i in range(n) if tasks[i] == t], device=bench.device) for t in names}
    cases = {}
    for suffix, spec in (("", Filters(0.1) + BatchNorm() + Head()), ("_block3", Blocks("block3") + Head())):
        bank = _adapter_bank(bench, spec)

        @torch.no_grad()
        def mixed(bank=bank) -> None:
            bank(bench.x, tasks=tasks)  # (N, C_max)

        @torch.no_grad()
        def separate(bank=bank) -> None:
            for t in names:
                bank(bench.x[index[t]], task=t)  # (N/4, C_t) each

        cases[f"mixed_4tasks{suffix}"], cases[f"separate_4x{suffix}"] = mixed, separate
    return cases


def adapter_storage(bench: Bench) -> dict:
    """Bytes on disk of each task's adapter folder vs one full model's tensors."""
    import tempfile

    from shared_backbone.adapters import ADAPTER_WEIGHTS, adapter_bytes

    bank = _adapter_bank(bench)
    full_bytes = sum(t.numel() * t.element_size() for t in bench.frozen.tensors().values())
    per_task = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, _ in ADAPTER_TASKS:
            d = bank.save_adapter(name, Path(tmp) / name)
            per_task[name] = {"adapter_bytes": adapter_bytes(d), "learned": bank.adapter(name).num_learned(),
                              "safetensors_bytes": (d / ADAPTER_WEIGHTS).stat().st_size}
    mean = statistics.mean(v["adapter_bytes"] for v in per_task.values())
    return {"spec": repr(bank.adapter("a").spec), "per_task": per_task, "full_model_bytes": full_bytes,
            "mean_adapter_over_full": mean / full_bytes,
            "note": "adapter_bytes = adapter_config.json + adapter_model.safetensors (slice, head, every BN "
                    "statistic); full model = the backbone's state dict tensors"}


# (name, numerator, denominator, numerator scale, denominator scale, target op, target value)
RATIOS = {
    "slice_step": [
        ("slice_over_full", "filters0.1_K1", "full_K1", 1, 1, "<", 1.0),
        # issue 13: a K=1 member step against a plain module's full step, and against Full() in the library
        ("k1_slice_bn_head_over_full_step", "filters0.1_bn_head_K1", "full_plain_x1", 1, 1, "<=", 0.8),
        ("k1_slice_bn_head_over_full_K1", "filters0.1_bn_head_K1", "full_K1", 1, 1, None, None),
    ],
    "ensemble_step": [
        ("naive_loop_over_vmap", "naive_loop", "vmap", 1, 1, ">=", 1.3),
        ("loop_over_vmap", "loop", "vmap", 1, 1, None, None),
        ("vmap_over_8x_full", "vmap", "full_plain_x1", 1, "K", "<=", 1.0),
        ("loop_over_8x_full", "loop", "full_plain_x1", 1, "K", None, None),
        # issue 13: the execution `auto` picks (loop on CPU, vmap on CUDA; "auto" below is resolved per
        # device), and vmap's speed relative to the loop (loop time / vmap time; >= 0.95: never the slow path)
        ("k8_auto_over_8x_full", "auto", "full_plain_x1", 1, "K", "<=", 0.8),
        ("vmap_speed_over_loop", "loop", "vmap", 1, 1, ">=", 0.95),
    ],
    "adapters": [
        ("separate_over_mixed", "separate_4x", "mixed_4tasks", 1, 1, None, None),
        ("mixed_over_separate", "mixed_4tasks", "separate_4x", 1, 1, None, None),
        ("mixed_block3_over_separate", "mixed_4tasks_block3", "separate_4x_block3", 1, 1, "<=", 0.5),
    ],
    "shared_prefix": [
        ("head_K8_over_full", "head_K8", "full_plain_x1", 1, 1, "<=", 1.5),
        ("block3_K8_over_full", "block3_K8", "full_plain_x1", 1, 1, "<=", 4.0),
    ],
}


def _met(value: float, op: str | None, target: float | None) -> bool | None:
    if op is None:
        return None
    return {"<": value < target, "<=": value <= target, ">=": value >= target}[op]


def time_suite(bench: Bench, suite: str, repeats: int, warmup: int, log=print) -> dict:
    cases = suite_cases(bench, suite)
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        order = names[shift:] + names[:shift]  # interleaved, rotating start
        for n in order:
            sync(bench.device)
            t0 = time.perf_counter()
            cases[n]()
            sync(bench.device)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[n].append(dt)
        if r < warmup:
            log(f"  [{suite}] warmup {r + 1}/{warmup} done", flush=True)
        else:
            log(f"  [{suite}] repeat {r - warmup + 1}/{repeats}: "
                + ", ".join(f"{n}={times[n][-1]:.3f}s" for n in names), flush=True)
    k = bench.cfg["members"]
    out_cases = {n: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "all_s": ts}
                 for n, ts in times.items()}
    ratios = {}
    auto = "vmap" if bench.device.type == "cuda" else "loop"  # what the scripts' --execution auto runs
    for name, num, den, sn, sd, op, target in RATIOS[suite]:
        num, den = (auto if c == "auto" else c for c in (num, den))
        sn = k if sn == "K" else sn
        sd = k if sd == "K" else sd
        of_medians = (sn * out_cases[num]["median_s"]) / (sd * out_cases[den]["median_s"])
        paired = statistics.median((sn * a) / (sd * b) for a, b in zip(times[num], times[den]))
        ratios[name] = {
            "value": of_medians, "median_of_paired": paired,
            "definition": f"{'' if sn == 1 else f'{sn} x '}{num} / {'' if sd == 1 else f'{sd} x '}{den}",
            "target": None if op is None else f"{op} {target}", "met": _met(of_medians, op, target),
        }
    return {"cases": out_cases, "ratios": ratios}


# ---------------------------------------------------------------------------------------------
# diagnostics
# ---------------------------------------------------------------------------------------------
def channels_last_check(bench: Bench) -> dict:
    """Does a channels_last input stay channels_last through the first conv / the ensemble?"""
    x = bench.x_cl
    w = torch.randn(bench.cfg["width"], bench.cfg["in_channels"], 3, 3, device=bench.device)
    out = F.conv2d(x, w, padding=1)
    return {
        "input_is_channels_last": x.is_contiguous(memory_format=torch.channels_last),
        "input_is_also_nchw_contiguous": x.is_contiguous(),
        "first_conv_output_channels_last": out.is_contiguous(memory_format=torch.channels_last)
        and not out.is_contiguous(),
        "note": "with in_channels=1 an NCHW tensor already has channels_last strides, so the "
                "input format alone may not change what the convs do",
    }


def profile_steps(bench: Bench, top: int = 15) -> dict:
    """Top ops by self CPU time of one (warm) vmap step and one loop step of the K-member ensemble."""
    from torch.profiler import ProfilerActivity, profile

    spec = Filters(0.1) + BatchNorm() + Head()
    out = {}
    for name, vec in (("vmap", True), ("loop", False)):
        step, _ = bench.ensemble_case(spec, bench.cfg["members"], vectorized=vec)
        step()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
        with profile(activities=acts, record_shapes=True) as prof:
            step()
            sync(bench.device)
        avg = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in avg)
        rows = sorted(avg, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        by_shape = sorted(prof.key_averages(group_by_input_shape=True),
                          key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        out[name] = {
            "self_cpu_total_s": total / 1e6,
            "top_ops": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count,
                         "share": e.self_cpu_time_total / total if total else 0.0} for e in rows],
            "top_ops_by_shape": [{"op": e.key, "shapes": str(e.input_shapes)[:200],
                                  "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
                                 for e in by_shape],
        }
    return out


# ---------------------------------------------------------------------------------------------
# memory: one subprocess per case
# ---------------------------------------------------------------------------------------------
# ensemble cases: name -> (vectorized, members per group; None = all at once); a group of one never vmaps
MEM_ENSEMBLE = {
    "ensemble_K8_vmap": (True, None), "ensemble_K8_loop": (False, None),
    "ensemble_K8_vmap_groups4": (True, 4), "ensemble_K8_vmap_groups2": (True, 2),
    "ensemble_K8_loop_groups4": (False, 4), "ensemble_K8_loop_groups2": (False, 2),
    "ensemble_K8_groups1": (False, 1),
}
MEM_CASES = (*MEM_ENSEMBLE, "full_plain_x1")


def _maxrss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # Linux reports KiB


def _status_field(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _hwm_bytes() -> int | None:
    return _status_field("VmHWM") if os.access("/proc/self/clear_refs", os.W_OK) else None


def _rss_bytes() -> int | None:
    return _status_field("VmRSS")


def mem_child(args) -> None:
    """Run in a fresh process: build one case, then measure the peak of ``--warmup + 1`` steps."""
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    bench = Bench(make_config(args), device)
    k = bench.cfg["members"]
    spec = Filters(0.1) + BatchNorm() + Head()
    if args._mem_case.startswith("lc_"):
        step = lc_step_from_name(bench, args._mem_case)
    elif args._mem_case in MEM_ENSEMBLE:
        vectorized, group_size = MEM_ENSEMBLE[args._mem_case]
        step, _ = bench.ensemble_case(spec, k, vectorized=vectorized, group_size=group_size)
    else:
        step, _ = bench.plain_case()
    seconds: list[float] = []

    def steps() -> None:
        for _ in range(args.warmup + 1):
            t0 = time.perf_counter()
            step()
            sync(device)
            seconds.append(time.perf_counter() - t0)

    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        steps()
        peak = torch.cuda.max_memory_allocated(device)
        res = {"before_bytes": before, "peak_bytes": peak, "delta_bytes": peak - before}
    elif _hwm_bytes() is not None:
        # VmHWM is this process's own peak RSS; writing "5" to clear_refs resets it to the current
        # RSS, so the parent's high-water mark (inherited by ru_maxrss across exec) does not leak in
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_bytes()
        steps()
        peak = _hwm_bytes()
        res = {"before_bytes": before, "peak_bytes": peak, "delta_bytes": peak - before,
               "ru_maxrss_bytes": _maxrss_bytes(), "method": "VmHWM after clear_refs=5"}
    else:
        before = _maxrss_bytes()
        steps()
        peak = _maxrss_bytes()
        res = {"before_bytes": before, "peak_bytes": peak, "delta_bytes": peak - before,
               "method": "ru_maxrss delta"}
    res["last_step_s"] = seconds[-1]  # indicative only: each case runs alone, in its own process
    print("MEMRESULT " + json.dumps(res), flush=True)


def distributed_suite(args) -> dict:
    """K=8 members trained by ``fit`` in 1 process vs 2 processes (``accelerate launch``), member-
    and data-parallel. Each run in fresh processes; the cores are split evenly between processes
    (on this 2-core CPU: 1 process x 2 threads vs 2 processes x 1 thread). On GPUs run
    ``scripts/bench.py --only distributed --device cuda --processes N`` on an N-GPU machine."""
    import socket
    import tempfile

    worker = str(ROOT / "scripts" / "_dist_bench_worker.py")
    procs = args.processes
    cores = os.cpu_count() or 1
    threads_one = max(1, min(args.threads, cores))
    threads_many = max(1, threads_one // procs)
    steps = 2 if args.quick else 6
    common = ["--steps", str(steps), "--warmup", "1" if args.quick else "2"] + \
        (["--width", "4", "--batch", "32", "--image", "16"] if args.quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_many)}

    def port() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return str(s.getsockname()[1])

    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        plan = [("one_process", [sys.executable, worker], threads_one, "members")]
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        for mode in ("members", "data"):
            plan.append((f"{procs}proc_{mode}", launch + ["--main_process_port", port(), worker], threads_many, mode))
        for r in range(args.repeats):
            for name, cmd, threads, mode in plan:
                out = Path(tmp) / f"{name}_{r}.json"
                proc = subprocess.run(cmd + [str(out), "--parallel", mode, "--threads", str(threads)] + common,
                                      capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
                if proc.returncode != 0 or not out.exists():
                    raise RuntimeError(f"distributed case {name} failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
                runs.setdefault(name, []).append(json.loads(out.read_text()))
                print(f"  [distributed] {name} repeat {r + 1}: {runs[name][-1]['median_step_s']:.3f} s/step", flush=True)
    cases = {n: {"median_s": statistics.median(x["median_step_s"] for x in v),
                 "all_s": [x["median_step_s"] for x in v], "processes": v[0]["processes"],
                 "threads_per_process": v[0]["threads_per_process"], "execution": v[0].get("execution")}
             for n, v in runs.items()}
    one = cases["one_process"]["median_s"]
    ratios = {
        f"one_over_{procs}proc_members": {"value": one / cases[f"{procs}proc_members"]["median_s"], "met": None},
        f"one_over_{procs}proc_data": {"value": one / cases[f"{procs}proc_data"]["median_s"], "met": None},
        "data_over_members": {"value": cases[f"{procs}proc_data"]["median_s"] / cases[f"{procs}proc_members"]["median_s"],
                              "met": None},
    }
    return {"cases": cases, "ratios": ratios, "cores": cores,
            "note": f"seconds per optimizer step of K=8 members (global batch {32 if args.quick else 128}), "
                    "median over steps, then over repeats; every process count shares the same cores"}


def _mem_case_words(case: str) -> str:
    vectorized, group_size = MEM_ENSEMBLE[case]
    groups = "all members at once" if group_size is None else f"members in groups of {group_size}"
    return f"{'vmap' if vectorized else 'loop'} ensemble, {groups}"


def memory_suite(bench: Bench, args) -> dict:
    device = bench.device
    out: dict = {
        "method": (
            "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated "
            "after building the case (tensors only, caching allocator excluded)"
            if device.type == "cuda" else
            "peak RSS in a fresh subprocess per case: /proc/self/status VmHWM after resetting it with "
            "/proc/self/clear_refs=5 (ru_maxrss cannot be used as is: Linux carries the parent's "
            "high-water mark across exec; it is the fallback where /proc is missing), over "
            f"{args.warmup + 1} training step(s) minus the peak RSS after building the case (model, "
            "optimizer, batch) [RSS at reset]; includes allocator and oneDNN scratch, excludes the step-independent "
            "footprint (torch itself, the frozen backbone)"
        ),
        "cases": {},
    }
    base = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads),
            "--device", device.type, "--warmup", str(args.warmup)] + (["--quick"] if args.quick else [])
    for case in MEM_CASES:
        proc = subprocess.run(base + ["--_mem-case", case], capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMRESULT ")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"memory case {case} failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
        out["cases"][case] = json.loads(line[-1][len("MEMRESULT "):])
    c = out["cases"]
    full = max(c["full_plain_x1"]["delta_bytes"], 1)
    out["ratios"] = {
        f"{case}_over_full": {"value": c[case]["delta_bytes"] / full,
                              "definition": f"step peak delta, K=8 {_mem_case_words(case)} / one full model"}
        for case in MEM_ENSEMBLE
    }
    # what the scripts' --execution auto and fit()'s unset TrainConfig.member_group_size run
    vectorized = device.type == "cuda"  # the execution --execution auto picks
    groups = auto_group_size(bench.cfg["members"], device, vectorized)
    auto = ("ensemble_K8_groups1" if groups == 1 else
            f"ensemble_K8_{'vmap' if vectorized else 'loop'}" + (f"_groups{groups}" if groups else ""))
    value = c[auto]["delta_bytes"] / full
    out["ratios"]["peak_memory_k8_auto_over_full"] = {
        "value": value, "target": "<= 4", "met": value <= 4,
        "definition": f"step peak delta, K=8 ensemble with the execution and member groups fit() picks by default "
                      f"({auto}) / one full model"}
    ens_d = describe(bench.frozen, Filters(0.1) + BatchNorm() + Head(), members=bench.cfg["members"], verbose=False)
    full_d = describe(bench.frozen, Full(), verbose=False)
    full_bytes = sum(t.numel() * t.element_size() for t in bench.frozen.tensors().values())
    out["storage"] = {
        "spec": ens_d["spec"],
        "stored_bytes_per_member": ens_d["stored_bytes"],
        "learnable_per_member": ens_d["learnable"],
        "full_model_stored_bytes": full_d["stored_bytes"],
        "full_model_state_dict_bytes": full_bytes,
        "member_over_full": ens_d["stored_bytes"] / full_d["stored_bytes"],
        "ensemble_K8_total_bytes_over_8_full": (full_bytes + bench.cfg["members"] * ens_d["stored_bytes"])
        / (bench.cfg["members"] * full_bytes),
        "note": "full_model_stored_bytes is describe(frozen, Full()); ensemble total = one backbone "
                "(state dict) + K member slices",
    }
    return out


# ---------------------------------------------------------------------------------------------
# lc: LC-Blocks (issue 4), fused vs unfused, vs a plain ResNet-20, peak memory
# ---------------------------------------------------------------------------------------------
LC_UNFUSED_CAP = 3 * 2**30  # bytes of (N, c_out*E, H, W) activations the unfused path may keep for backward


def lc_expansions(cfg: dict) -> tuple[int, ...]:
    return (2, 4, 8) if cfg["quick"] else (8, 32, 128)


def lc_unfused_bytes(cfg: dict, expansion: int, batch: int) -> int:
    """float32 outputs of the unfused LC-Blocks' k x k convs of a ResNet-20 (kept for the 1x1s' backward)."""
    s1, w = cfg["image"], cfg["width"]
    s2 = -(-s1 // 2)
    s3 = -(-s2 // 2)
    layers = ((7, w, s1), (6, 2 * w, s2), (6, 4 * w, s3))  # stem + block1, block2, block3
    return sum(n * batch * c * expansion * s * s * 4 for n, c, s in layers)


def lc_batch(cfg: dict, expansion: int) -> int:
    """The batch the unfused case runs at: halved until its activations fit LC_UNFUSED_CAP."""
    b = cfg["batch"]
    while b > 1 and lc_unfused_bytes(cfg, expansion, b) > LC_UNFUSED_CAP:
        b //= 2
    return b


def _plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                y: torch.Tensor) -> Callable[[], None]:
    """One SGD training step of a plain module on a fixed batch (the recipe every suite uses)."""
    def step() -> None:
        loss = F.cross_entropy(model(x), y, label_smoothing=SMOOTH)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def lc_case(bench: Bench, expansion: int, fused: bool, batch: int, sharing: str = "none") -> Callable[[], None]:
    """One training step of LCResNet-20-{W}x{E} with frozen spatial filters (plain module, SGD)."""
    from shared_backbone.lc import freeze_spatial

    cfg = bench.cfg
    torch.manual_seed(cfg["seed"])
    model = build_backbone("lcresnet20", in_channels=cfg["in_channels"], width=cfg["width"],
                           num_classes=cfg["num_classes"], expansion=expansion, fused=fused, sharing=sharing,
                           share_fraction=1 / 16 if sharing == "recycled" else 1.0).to(bench.device).train()
    opt = torch.optim.SGD(freeze_spatial(model), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WD)
    x, y = bench.x[:batch], bench.y[:batch]
    return _plain_step(model, opt, x, y)


LC_PAPER_SETTING = {"in_channels": 3, "image": 32, "batch": 256}  # the LC paper's CIFAR-10 training steps


def lc_paper_setting_case(bench: Bench, lc: bool) -> Callable[[], None]:
    """One step at the LC paper's CIFAR-10 shapes (3x32x32, batch 256): fused LCResNet-20-{W}x{E_max}
    with frozen spatial filters (``lc=True``) or the plain ResNet-20-{W}, every weight learned."""
    from shared_backbone.lc import freeze_spatial

    cfg = bench.cfg
    shape = {"in_channels": 3, "image": 8, "batch": 4} if cfg["quick"] else LC_PAPER_SETTING
    torch.manual_seed(cfg["seed"])
    if lc:
        model = build_backbone("lcresnet20", in_channels=3, width=cfg["width"], num_classes=cfg["num_classes"],
                               expansion=max(lc_expansions(cfg)))
        params = freeze_spatial(model)
    else:
        model = build_backbone("resnet20", in_channels=3, width=cfg["width"], num_classes=cfg["num_classes"])
        params = model.parameters()
    model = model.to(bench.device).train()
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WD)
    g = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randn(shape["batch"], 3, shape["image"], shape["image"], generator=g).to(bench.device)
    y = torch.randint(0, cfg["num_classes"], (shape["batch"],), generator=g).to(bench.device)
    return _plain_step(model, opt, x, y)


def lc_case_names(cfg: dict) -> dict[str, tuple]:
    """``{case: (E, fused, batch[, sharing])}``; where the unfused case needs a smaller batch, a fused twin
    runs at it; the largest E also runs with global and recycled (1/16) weight sharing."""
    out = {}
    for e in lc_expansions(cfg):
        b = lc_batch(cfg, e)
        out[f"fused_E{e}"] = (e, True, cfg["batch"])
        out[f"unfused_E{e}" + ("" if b == cfg["batch"] else f"_b{b}")] = (e, False, b)
        if b != cfg["batch"]:
            out[f"fused_E{e}_b{b}"] = (e, True, b)
    e = max(lc_expansions(cfg))
    out[f"fused_E{e}_global"] = (e, True, cfg["batch"], "global")
    out[f"fused_E{e}_recycled16"] = (e, True, cfg["batch"], "recycled")
    return out


def lc_cases(bench: Bench) -> dict[str, Callable[[], None]]:
    cases = {n: lc_case(bench, *spec) for n, spec in lc_case_names(bench.cfg).items()}
    cases["plain_resnet20"] = bench.plain_case()[0]
    e = max(lc_expansions(bench.cfg))
    cases[f"fused_E{e}_paper_setting"] = lc_paper_setting_case(bench, lc=True)
    cases["plain_resnet20_paper_setting"] = lc_paper_setting_case(bench, lc=False)
    return cases


def lc_ratios(cfg: dict) -> list[tuple]:
    names = lc_case_names(cfg)
    out = []
    for e in lc_expansions(cfg):
        (unfused,) = [n for n, (ee, f, *_) in names.items() if ee == e and not f]
        b = names[unfused][2]
        fused = f"fused_E{e}" + ("" if b == cfg["batch"] else f"_b{b}")
        out.append((f"unfused_over_fused_E{e}", unfused, fused, 1, 1, ">=", 1.0))
    e = max(lc_expansions(cfg))
    out.append((f"fused_E{e}_over_plain_resnet20", f"fused_E{e}", "plain_resnet20", 1, 1, "<=", 1.3))
    out.append((f"fused_E{e}_over_plain_resnet20_paper_setting", f"fused_E{e}_paper_setting",
                "plain_resnet20_paper_setting", 1, 1, "<=", 1.3))
    out.append((f"global_over_unshared_E{e}", f"fused_E{e}_global", f"fused_E{e}", 1, 1, None, None))
    out.append((f"recycled16_over_unshared_E{e}", f"fused_E{e}_recycled16", f"fused_E{e}", 1, 1, None, None))
    return out


def lc_step_from_name(bench: Bench, name: str) -> Callable[[], None]:
    """``lc_<case>`` of :func:`lc_case_names` (or ``lc_plain_resnet20``), for the memory subprocess."""
    case = name[len("lc_"):]
    if case == "plain_resnet20":
        return bench.plain_case()[0]
    names = lc_case_names(bench.cfg)
    if case not in names:
        raise SystemExit(f"unknown lc memory case {name!r}; known: {', '.join('lc_' + n for n in names)}")
    return lc_case(bench, *names[case])


def lc_suite(bench: Bench, args) -> dict:
    RATIOS["lc"] = lc_ratios(bench.cfg)
    body = time_suite(bench, "lc", args.repeats, args.warmup)
    body["config"] = {"arch": "lcresnet20", "width": bench.cfg["width"], "expansions": list(lc_expansions(bench.cfg)),
                      "trained": "1x1s, BN, head (freeze_spatial); SGD as in the other suites",
                      "batches": {n: c[2] for n, c in lc_case_names(bench.cfg).items()},
                      "unfused_cap_bytes": LC_UNFUSED_CAP,
                      "paper_setting": {"in_channels": 3, "image": 8, "batch": 4} if bench.cfg["quick"] else LC_PAPER_SETTING,
                      "note": "an unfused case whose k x k outputs exceed the cap runs at a halved batch, "
                              "paired with a fused case at the same batch"}
    base = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads),
            "--device", bench.device.type, "--warmup", str(args.warmup)] + (["--quick"] if args.quick else [])
    mem = {"method": "as the memory suite: one fresh subprocess per case, peak over warmup + 1 steps", "cases": {}}
    for case in (list(lc_case_names(bench.cfg)) + ["plain_resnet20"]) if args.lc_memory == "on" else []:
        proc = subprocess.run(base + ["--_mem-case", f"lc_{case}"], capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEMRESULT ")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"lc memory case {case} failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
        mem["cases"][case] = json.loads(line[-1][len("MEMRESULT "):])
    body["memory"] = mem
    return body


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
HEADLINE = {  # issue 13's table: measure -> (suite, ratio)
    "k1_slice_bn_head_over_full_step": ("slice_step", "k1_slice_bn_head_over_full_step"),
    "k8_auto_over_8x_full_step": ("ensemble_step", "k8_auto_over_8x_full"),
    "vmap_speed_over_loop_k8": ("ensemble_step", "vmap_speed_over_loop"),
    "lc_fused_x128_over_plain_resnet20": ("lc", "fused_E{e}_over_plain_resnet20"),
    "mixed_4_block3_adapters_over_4_calls": ("adapters", "mixed_block3_over_separate"),
    "peak_memory_k8_over_one_model": ("memory", "peak_memory_k8_auto_over_full"),
}


def headline(res: dict) -> dict:
    """The issue-13 measures found in this run's suites, by name (missing suites are left out)."""
    out = {}
    for name, (suite, ratio) in HEADLINE.items():
        body = res["suites"].get(suite)
        if body is None:
            continue
        if "{e}" in ratio:
            ratio = ratio.format(e=max(body["config"]["expansions"]))
        r = body["ratios"][ratio]
        out[name] = {"value": r["value"], "median_of_paired": r.get("median_of_paired"), "target": r.get("target"),
                     "met": r.get("met"), "from": f"{suite}.{ratio}"}
    return out


def git_commit() -> dict:
    def run(*cmd):
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return ""
    head = run("git", "rev-parse", "HEAD") or None
    dirty = bool(run("git", "status", "--porcelain", "--untracked-files=no")) if head else None
    return {"commit": head, "dirty": dirty}


def format_report(res: dict) -> str:
    lines = [f"shared_backbone bench  torch {res['torch']}  device {res['device']}  threads {res['threads']}  "
             f"repeats {res['repeats']} (+{res['warmup']} warmup)  batch {res['config']['batch']} "
             f"{res['config']['image']}x{res['config']['image']}  K={res['config']['members']}"]
    for suite, body in res["suites"].items():
        lines.append("")
        lines.append(f"== {suite}")
        if suite == "memory":
            lines.append(f"   method: {body['method']}")
            for n, c in body["cases"].items():
                lines.append(f"   {n:<28} step peak +{c['delta_bytes'] / 2**20:9.1f} MiB   "
                             f"(absolute peak {c['peak_bytes'] / 2**20:.1f} MiB)   last step {c['last_step_s']:.3f} s")
            for n, r in body["ratios"].items():
                lines.append(f"   {n:<36} {r['value']:8.2f}")
            s = body["storage"]
            lines.append(f"   stored per member ({s['spec']}): {s['stored_bytes_per_member']:,} B vs one full model "
                         f"{s['full_model_stored_bytes']:,} B  -> {s['member_over_full']:.4f}")
            continue
        if suite == "distributed":
            lines.append(f"   {body['note']}")
            for n, c in body["cases"].items():
                lines.append(f"   {n:<24}{c['median_s']:10.3f} s/step   ({c['processes']} x {c['threads_per_process']} "
                             "threads)   " + " ".join(f"{t:.3f}" for t in c["all_s"]))
            for n, r in body["ratios"].items():
                lines.append(f"   ratio {n:<34}{r['value']:8.3f}")
            continue
        lines.append(f"   {'case':<24}{'median s':>10}{'min s':>10}{'max s':>10}   all")
        for n, c in body["cases"].items():
            lines.append(f"   {n:<24}{c['median_s']:10.3f}{c['min_s']:10.3f}{c['max_s']:10.3f}   "
                         + " ".join(f"{t:.3f}" for t in c["all_s"]))
        for n, r in body["ratios"].items():
            met = "" if r["met"] is None else ("  MET" if r["met"] else "  MISSED")
            tgt = f"target {r['target']}" if r["target"] else ""
            lines.append(f"   ratio {n:<34}{r['value']:8.3f}  (paired {r['median_of_paired']:.3f})  "
                         f"{tgt}{met}")
        for n, c in body.get("memory", {}).get("cases", {}).items():
            lines.append(f"   memory {n:<26} step peak +{c['delta_bytes'] / 2**20:9.1f} MiB")
        if suite == "adapters":
            st = body["storage"]
            for n, t in st["per_task"].items():
                lines.append(f"   adapter {n}: {t['adapter_bytes']:,} B on disk ({t['learned']:,} learned)")
            lines.append(f"   one full model: {st['full_model_bytes']:,} B -> mean adapter / full "
                         f"{st['mean_adapter_over_full']:.4f}")
        if "channels_last_check" in body:
            lines.append(f"   channels_last: {body['channels_last_check']}")
        if "profile" in body:
            for name, p in body["profile"].items():
                lines.append(f"   profile {name}: self CPU {p['self_cpu_total_s']:.3f}s; top ops:")
                for op in p["top_ops"][:8]:
                    lines.append(f"      {op['op']:<40}{op['self_cpu_s']:8.3f}s {100 * op['share']:5.1f}%  x{op['calls']}")
    t = res["targets"]
    lines.append("")
    lines.append("headline (issue 13): " + ", ".join(f"{k}={v['value']:.3f}" for k, v in res["headline"].items()))
    lines.append(f"targets met: {t['met']}/{t['total']}  " + ", ".join(
        f"{k}={'met' if v else 'MISSED'}" for k, v in t["by_ratio"].items()))
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench.json", help="JSON output (written atomically)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per suite (median taken)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (batch 4, 8x8) for smoke tests")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--processes", type=int, default=2, help="processes for the distributed suite")
    ap.add_argument("--only", default=",".join(SUITES),
                    help=f"comma-separated suites out of {', '.join(SUITES)}")
    ap.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                    help="profile one vmap and one loop ensemble step (auto: when vmap is slower than the loop)")
    ap.add_argument("--lc-memory", choices=("on", "off"), default="on",
                    help="lc suite: measure each case's peak memory in a subprocess (off: timings only)")
    ap.add_argument("--_mem-case", dest="_mem_case", help=argparse.SUPPRESS)  # MEM_CASES or lc_*
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("--repeats must be >= 1, --warmup >= 0, --threads >= 1")
    args.suites = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.suites if s not in SUITES]
    if bad or not args.suites:
        ap.error(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args._mem_case:
        mem_child(args)
        return {}
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = make_config(args)
    bench = Bench(cfg, device)
    res: dict = {
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(), "repeats": args.repeats, "warmup": args.warmup, "config": cfg,
        "timing": "time.perf_counter around one full training step (cuda synchronized); cases interleaved "
                  "within each repeat, order rotating; median over repeats",
        "suites": {},
    }
    t_start = time.perf_counter()
    for suite in [s for s in SUITES if s in args.suites]:
        print(f"running {suite} ...", flush=True)
        if suite == "memory":
            res["suites"][suite] = memory_suite(bench, args)
            continue
        if suite == "lc":
            res["suites"][suite] = lc_suite(bench, args)
            continue
        if suite == "distributed":
            res["suites"][suite] = distributed_suite(args)
            continue
        body = time_suite(bench, suite, args.repeats, args.warmup)
        if suite == "adapters":
            body["storage"] = adapter_storage(bench)
        if suite == "ensemble_step":
            body["channels_last_check"] = channels_last_check(bench)
            slower = body["ratios"]["naive_loop_over_vmap"]["value"] < 1.0
            if args.profile == "always" or (args.profile == "auto" and slower):
                print("  profiling one vmap and one loop step ...", flush=True)
                body["profile"] = profile_steps(bench)
        res["suites"][suite] = body
    res["wall_s"] = time.perf_counter() - t_start
    by_ratio = {f"{s}.{n}": r["met"] for s, b in res["suites"].items() for n, r in b.get("ratios", {}).items()
                if r.get("met") is not None}
    res["targets"] = {"met": sum(by_ratio.values()), "total": len(by_ratio), "by_ratio": by_ratio}
    res["headline"] = headline(res)
    write_json(args.out, res)
    print()
    print(format_report(res))
    print(f"\nwrote {args.out}")
    return res


if __name__ == "__main__":
    main()
