"""Multi-process training: 2 CPU processes in one gloo group, launched as users launch them.

The workers (tests/_dist_worker.py) train in float64 so that the different order of float
operations between one process and two cannot grow into real differences over the steps.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shared_backbone.distributed import SilentSingleProcess, check_process_group, make_accelerator, member_split
from shared_backbone.io import load_tensors

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "_dist_worker.py")
sys.path.insert(0, str(ROOT / "tests"))
import _dist_worker as worker  # noqa: E402


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, processes: int = 2, check: bool = True, script: str = WORKER) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N`` on this CPU-only machine, as the README says."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), script, *args]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, WORKER, *args], env=_env(), capture_output=True, text=True, timeout=300)


def assert_same(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The reference: every setup trained by one plain process."""
    d = tmp_path_factory.mktemp("single")
    res = single("members,members_own,data", str(d))
    assert res.returncode == 0, res.stderr[-3000:]
    return {s: load_tensors(d / f"{s}.safetensors") for s in ("members", "members_own", "data")}


def test_member_parallel_gives_the_same_members_as_one_process(one_process, tmp_path):
    """3 members over 2 processes (2 + 1), each on the whole data stream, no gradient traffic;
    with one shared batch stream and with each member's own stream."""
    launch("members,members_own", str(tmp_path), "--parallel", "members")
    for setup in ("members", "members_own"):
        two, meta = load_tensors(tmp_path / f"{setup}.safetensors")
        ref, ref_meta = one_process[setup]
        assert meta["processes"] == 2 and ref_meta["processes"] == 1 and meta["steps"] == ref_meta["steps"]
        assert_same(two, ref, atol=1e-9)
        # logits were gathered per member: 3 members x all 203 test samples, no padding duplicates
        assert two["test_logits"].shape == (3, 203, 10)


def test_data_parallel_matches_one_process_with_the_same_global_batch(one_process, tmp_path):
    """Each process gets half of every batch of 32; DDP averages the gradients. (No BatchNorm here:
    batch statistics would be per shard, as in any DDP run without SyncBatchNorm.)"""
    launch("data", str(tmp_path), "--parallel", "data")
    two, meta = load_tensors(tmp_path / "data.safetensors")
    ref, _ = one_process["data"]
    assert meta["processes"] == 2
    assert_same(two, ref, atol=1e-9)
    # sharded evaluation: 203 samples over 2 processes in batches of 16 needs padding; none survives
    assert two["test_logits"].shape == (3, 203, 10)


def test_killed_run_resumes_mid_epoch_to_the_same_slices(one_process, tmp_path):
    """Checkpoints every 3 steps (16 steps in all); SIGKILL right after step 7, whose checkpoint is
    step 6, mid-epoch 1; resume finishes as if nothing happened."""
    ckpt = tmp_path / "run"
    (tmp_path / "a").mkdir()
    killed = single("members", str(tmp_path / "a"), "--ckpt", str(ckpt), "--kill-after", "7")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "a" / "members.safetensors").exists()
    state = (ckpt / "checkpoint" / "state.json").read_text()
    assert '"step": 6' in state and '"step_in_epoch": 6' in state and '"epoch": 0' in state
    res = single("members", str(tmp_path), "--ckpt", str(ckpt), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    resumed, meta = load_tensors(tmp_path / "members.safetensors")
    ref, ref_meta = one_process["members"]
    assert meta["steps"] == ref_meta["steps"] == 16
    assert_same(resumed, ref, atol=1e-12)
    # the interrupted epoch's loss and accuracy cover its steps before the checkpoint too
    for h, r in zip(meta["history"], ref_meta["history"], strict=True):
        assert h == pytest.approx(r, abs=1e-12)


def test_resume_under_two_processes_from_a_one_process_checkpoint(one_process, tmp_path):
    """Checkpoints hold the whole stack, so the process count may change between runs."""
    ckpt = tmp_path / "run"
    killed = single("members", str(tmp_path), "--ckpt", str(ckpt), "--kill-after", "10")
    assert killed.returncode == -signal.SIGKILL
    launch("members", str(tmp_path), "--parallel", "members", "--ckpt", str(ckpt), "--resume")
    resumed, meta = load_tensors(tmp_path / "members.safetensors")
    assert_same(resumed, one_process["members"][0], atol=1e-9)
    # epoch 1 was interrupted at step 10 of 8 + 8: epoch 2's statistics come from two processes and the checkpoint
    for h, r in zip(meta["history"], one_process["members"][1]["history"], strict=True):
        assert h == pytest.approx(r, abs=1e-9)


# ---------------------------------------------------------------- no processes needed


def test_silent_single_process_is_refused(monkeypatch):
    """`accelerate launch --multi_gpu --num_processes 2` without CUDA: each Accelerator sees only itself."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SilentSingleProcess, match=r"WORLD_SIZE=2.*Accelerator\(cpu=True\)"):
        check_process_group(SimpleNamespace(num_processes=1))
    check_process_group(SimpleNamespace(num_processes=2))  # joined: fine
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_process_group(SimpleNamespace(num_processes=1))


@pytest.mark.parametrize("members, procs, want", [
    (8, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (3, 2, [[0, 1], [2]]),
    (5, 3, [[0, 1], [2, 3], [4]]),
    (1, 1, [[0]]),
])
def test_member_split_is_contiguous_and_covers_every_member(members, procs, want):
    assert [member_split(members, procs, p) for p in range(procs)] == want


def test_more_processes_than_members_is_refused():
    with pytest.raises(ValueError, match=r"2 members over 3 processes"):
        member_split(2, 3, 0)


@pytest.mark.parametrize("bad", ["fp8", "half", 16])
def test_bad_mixed_precision(bad):
    with pytest.raises(ValueError, match="mixed_precision must be"):
        make_accelerator(bad)


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        make_accelerator("fp16", cpu=True)


def test_bad_parallel_mode_and_checkpoint_interval():
    from shared_backbone.train import fit

    ens, train, _ = worker.build("data")
    with pytest.raises(ValueError, match=r"parallel must be one of \('data', 'members', 'local'\), got 'model'"):
        fit(ens, train, parallel="model", progress=False)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive"):
        fit(ens, train, checkpoint_every=0, progress=False)


def test_bf16_autocast_trains_on_cpu():
    """Mixed precision through Accelerate: the forward in bf16, the loss in float32, slices stay float32."""
    import shared_backbone as sb
    from shared_backbone.data import TensorData
    from shared_backbone.train import TrainConfig, fit

    torch.manual_seed(0)
    frozen = sb.FrozenBackbone(sb.build_backbone("resnet20", width=4, in_channels=1, num_classes=3), seed=0)
    ens = sb.Ensemble(frozen, sb.Filters(0.5) + sb.BatchNorm() + sb.Head(), members=2)
    data = TensorData(torch.randn(64, 1, 12, 12), torch.randint(0, 3, (64,)), [0.0], [1.0])
    before = {n: p.detach().clone() for n, p in ens.slices.items()}
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one process-wide state: earlier tests made one
    try:
        rec = fit(ens, data, None, TrainConfig(epochs=1, batch_size=32, augment=False),
                  accelerator=make_accelerator("bf16", cpu=True), progress=False)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert rec["steps"] == 2 and all(torch.isfinite(torch.tensor(h["train_loss"])) for h in rec["history"])
    assert all(p.dtype == torch.float32 for p in ens.parameters())
    assert any(not torch.equal(before[n], p) for n, p in ens.slices.items())


class _NoCollectives:
    """A real one-process Accelerator that claims to be rank 1 of 2 and raises on every collective."""

    def __init__(self, real):
        self._real = real
        self.num_processes, self.process_index, self.is_main_process = 2, 1, False

    def __getattr__(self, name):
        if name in ("gather", "gather_for_metrics", "reduce", "wait_for_everyone", "prepare_model",
                    "prepare_data_loader", "split_between_processes", "pad_across_processes"):
            def refuse(*a, **k):
                raise AssertionError(f"parallel='local' called accelerator.{name}")
            return refuse
        return getattr(self._real, name)


def test_local_mode_calls_no_collective_and_trains_as_one_process(tmp_path):
    """fit(parallel="local") on a process of a 2-process group: training, checkpoints, resume and
    evaluation touch no collective, and the slices equal an ordinary one-process run's."""
    from shared_backbone.train import TrainConfig, fit

    cfg = TrainConfig(epochs=2, batch_size=32, augment=False, seed=3)
    ref, train, test = worker.build("members")
    ref_rec = fit(ref, train, test, cfg, accelerator=make_accelerator(cpu=True), progress=False)
    ens, _, _ = worker.build("members")
    fake = _NoCollectives(make_accelerator(cpu=True))
    stop = {"at": 5}

    class Stop(Exception):
        pass

    def on_step(step):
        if step == stop["at"]:
            raise Stop
    with pytest.raises(Stop):  # interrupted after a mid-epoch checkpoint...
        fit(ens, train, test, cfg, accelerator=fake, parallel="local", out_dir=tmp_path, checkpoint_every=2,
            on_step=on_step, progress=False)
    ens, _, _ = worker.build("members")  # ...and resumed in a fresh stack
    rec = fit(ens, train, test, cfg, accelerator=fake, parallel="local", out_dir=tmp_path, resume=True,
              progress=False)
    assert rec["processes"] == 1 and rec["steps"] == ref_rec["steps"]
    assert (tmp_path / "checkpoint" / "state.safetensors").is_file()
    got = {k: v for k, v in ens.state_dict().items()}
    assert_same(got, dict(ref.state_dict()), atol=1e-12)
    assert rec["test"]["accuracy"] == ref_rec["test"]["accuracy"]
    assert [h["train_loss"] for h in rec["history"]] == pytest.approx([h["train_loss"] for h in ref_rec["history"]],
                                                                     abs=1e-12)


ADAPTER_ARGS = ["--width", "4", "--epochs", "1", "--train-subset", "96", "--test-subset", "64", "--batch-size", "32",
                "--precise-bn", "2", "--no-progress", "--threads", "1"]


def test_task_parallel_adapters_match_one_process_each(tmp_path):
    """train_adapter.py with three tasks under 2 processes (2 + 1, of unequal sizes): each process trains
    its tasks alone (no traffic), and each adapter, accuracy and loss history equals what a plain
    single-process run of that task writes."""
    script = str(ROOT / "scripts" / "train_adapter.py")
    card = (ROOT / "tasks" / "mnist5k.toml").read_text()
    third = tmp_path / "mnist5k_other.toml"  # a user's card: same data, another split
    third.write_text(card.replace('name = "mnist5k"', 'name = "mnist5k_other"').replace("split_seed = 0", "split_seed = 7"))
    tasks = {"mnist5k": "mnist5k", "digits": "digits", "mnist5k_other": str(third)}
    res = launch("--task", *tasks.values(), "--out", str(tmp_path / "two"), *ADAPTER_ARGS, script=script)
    assert "3 processes" not in res.stdout and "2 processes, tasks-parallel" in res.stdout
    for i, (name, task) in enumerate(tasks.items()):
        one = subprocess.run([sys.executable, script, "--task", task, "--out", str(tmp_path / "one" / name),
                              *ADAPTER_ARGS], env=_env(), capture_output=True, text=True, timeout=300)
        assert one.returncode == 0, one.stderr[-3000:]
        a, _ = load_tensors(tmp_path / "two" / name / "adapter_model.safetensors")
        b, _ = load_tensors(tmp_path / "one" / name / "adapter_model.safetensors")
        assert_same(a, b, atol=0)
        two_report = json.loads((tmp_path / "two" / f"{name}.results.json").read_text())
        one_report = json.loads((tmp_path / "one" / f"{name}.results.json").read_text())
        assert two_report["parallel"] == "local" and two_report["process"] == (0 if i < 2 else 1)
        assert two_report["accuracy"] == one_report["accuracy"]
        assert two_report["history"] == one_report["history"]
    assert (tmp_path / "two" / "backbone.json").is_file()


def test_task_parallel_needs_a_task_per_process(tmp_path):
    script = str(ROOT / "scripts" / "train_adapter.py")
    res = launch("--task", "mnist5k", "--parallel", "tasks", "--out", str(tmp_path / "a"), *ADAPTER_ARGS,
                 script=script, check=False)
    assert res.returncode != 0 and "at least one task per process: 1 task(s) over 2 processes" in res.stderr


def test_every_process_follows_the_main_processes_plan(tmp_path):
    """Each process times the steps that size the equal-cost baseline; the main job used to plan from its
    own timing, so on a loaded machine the processes trained different step counts and hung in DDP."""
    launch(str(tmp_path), script=str(ROOT / "tests" / "_dist_plan_worker.py"))
    plans = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert plans[0] == plans[1]
    # rank 0 measured 1 single-model step per ensemble step: 4 ensemble steps are a budget of 4
    assert plans[0]["timing"]["ensemble_step_in_single_steps"] == 1.0
    assert plans[0]["baseline_steps"] == 4 and plans[0]["ensemble_steps"] == 4
