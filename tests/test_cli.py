"""The ``shared-backbone`` command: generated training flags, registry-driven backbone options, entry points."""
from __future__ import annotations

import dataclasses
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared_backbone import build_backbone, list_backbones
from shared_backbone.backbones import backbone_config
from shared_backbone.cli import JOBS, _args
from shared_backbone.cli import main as cli_main
from shared_backbone.cli import train_adapter, train_ensemble
from shared_backbone.saving import load_ensemble
from shared_backbone.train import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
FIELDS = dataclasses.fields(TrainConfig)
# the jobs that train, with the arguments they require
TRAINING_JOBS = {"train-ensemble": [], "train-adapter": ["--task", "digits", "--out", "x"],
                 "reproduce-ensembles": [], "reproduce-partial": [], "reproduce-transfer": [], "reproduce-lc": []}


def _job(name: str):
    import importlib

    return importlib.import_module(f"shared_backbone.cli.{JOBS[name][0]}")


def _parser(name: str):
    return _job(name).parser()


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- training flags
def test_every_trainconfig_field_has_help():
    missing = [f.name for f in FIELDS if not f.metadata.get("help")]
    assert not missing, f"TrainConfig fields without metadata help: {missing}"


@pytest.mark.parametrize("job", sorted(TRAINING_JOBS))
def test_generated_flags_default_to_trainconfig(job):
    """Every TrainConfig field is a flag of every training job; its default is the field's, except the
    few a job declares in its TRAIN_DEFAULTS (and nowhere else)."""
    ap = _parser(job)
    args = ap.parse_args(TRAINING_JOBS[job])
    overrides = getattr(_job(job), "TRAIN_DEFAULTS", {})
    for f in FIELDS:
        want = overrides.get(f.name, f.default)
        assert getattr(args, f.name) == want, (job, f.name)
    assert set(overrides) <= {f.name for f in FIELDS}
    text = " ".join(ap.format_help().split())
    for f in FIELDS:
        assert "--" + f.name.replace("_", "-") in text, f.name
        assert " ".join(f.metadata["help"].split()) in text, f.name


def test_generated_flags_build_the_config_they_describe():
    ap = train_ensemble.parser()
    args = ap.parse_args(["--lr", "0.2", "--no-augment", "--no-nesterov", "--bootstrap", "--batch-size", "7",
                          "--max-steps-per-epoch", "3", "--l1-pointwise", "1e-4", "--label-smoothing", "0",
                          "--member-group-size", "2"])
    cfg = _args.train_config(ap, args)
    want = dict(epochs=3, batch_size=7, lr=0.2, momentum=0.9, nesterov=False, weight_decay=5e-4,
                label_smoothing=0.0, augment=False, seed=0, bootstrap=True, eval_batch_size=1000, precise_bn=20,
                l1_pointwise=1e-4, max_steps_per_epoch=3, schedule_from=0.0, schedule_to=1.0, member_group_size=2)
    assert dataclasses.asdict(cfg) == want


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "lr must be > 0"),
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--precise-bn", "-2"], "precise_bn must be"),
    (["--member-group-size", "-1"], "member_group_size must be a number of members per group"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
])
def test_bad_training_flags_are_usage_errors(argv, message, capsys):
    ap = train_ensemble.parser()
    with pytest.raises(SystemExit) as info:
        _args.train_config(ap, ap.parse_args(argv))
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- backbone options
TINY = {"width": "4", "widen_factor": "1", "growth_rate": "4", "width_mult": "0.25", "expansion": "2",
        "small_input": "true", "depth": "10"}
TORCHVISION_BIG = ("resnet18", "resnet50", "wide_resnet50_2")  # argument resolution only


def _tiny_argv(name: str) -> tuple[list[str], dict]:
    """Flags giving ``name`` its tiny options, and the typed options they must resolve to."""
    defaults = backbone_config(name)
    argv, want = ["--backbone", name], {}
    for key, text in TINY.items():
        if key not in defaults or (key == "depth" and name != "densenet_bc100"):
            continue
        argv += ["--width", text] if key == "width" else ["--backbone-opt", f"{key}={text}"]
        want[key] = type(defaults[key])(text) if not isinstance(defaults[key], bool) else text == "true"
    return argv, want


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_resolves_its_options_through_the_main_job(name):
    argv, want = _tiny_argv(name)
    args = train_ensemble.parser().parse_args(argv)
    opts = _args.backbone_options(args)
    assert opts == want and all(type(opts[k]) is type(want[k]) for k in want)
    if name not in TORCHVISION_BIG:
        bb = build_backbone(name, **opts, in_channels=1, num_classes=10)
        assert {k: bb.config[k] for k in want} == want


@pytest.mark.parametrize("name", [n for n in list_backbones() if n not in TORCHVISION_BIG])
def test_every_small_backbone_trains_one_batch_with_the_main_job(name, tmp_path):
    argv, want = _tiny_argv(name)
    out = tmp_path / "run"
    report = train_ensemble.main(argv + [
        "--task", "digits", "--members", "1", "--warm-start-epochs", "0", "--budget-epochs", "0",
        "--slice", "Head()", "--epochs", "1", "--max-steps-per-epoch", "1",
        "--train-subset", "16", "--test-subset", "16", "--batch-size", "16", "--precise-bn", "0", "--ood", "none",
        "--execution", "loop", "--threads", "1", "--no-progress", "--baseline", "none", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["backbone"] == name and report["train"]["steps"] == 1
    assert results["backbone_config"] == {"in_channels": 1, "num_classes": 10, **want}
    assert load_ensemble(out / "ensemble").frozen.config["arch"] == name


def test_resume_on_another_runs_checkpoint_is_a_usage_error_naming_the_difference(tmp_path, capsys):
    argv = ["--task", "digits", "--members", "2", "--epochs", "1", "--max-steps-per-epoch", "2", "--width", "4",
            "--warm-start-epochs", "0", "--budget-epochs", "0",
            "--train-subset", "32", "--test-subset", "16", "--batch-size", "16", "--precise-bn", "0", "--ood", "none",
            "--execution", "loop", "--threads", "1", "--no-progress", "--baseline", "none", "--out", str(tmp_path)]
    train_ensemble.main(argv)
    assert (tmp_path / "checkpoint").is_dir()
    with pytest.raises(SystemExit) as info:  # another seed: another backbone and another data order
        train_ensemble.main(argv + ["--resume", "--seed", "1"])
    assert info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "seed" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "resnet18", "--width", "4"], "backbone 'resnet18' does not take --width; accepted options: "
                                                   "small_input=False"),
    (["--backbone", "vgg19", "--backbone-opt", "depth=3"], "backbone 'vgg19' does not take 'depth'; accepted "
                                                           "options: width=64, kernel_size=3"),
    (["--backbone-opt", "in_channels=3"], "'in_channels' comes from the task card"),
    (["--backbone-opt", "width"], "--backbone-opt takes KEY=VALUE, got 'width'"),
    (["--backbone-opt", "kernel_size=big"], "option kernel_size='big': expected int"),
    (["--backbone", "vgg19_bn", "--width", "8", "--backbone-opt", "width=4"], "'width' is given twice"),
    (["--backbone", "resnet21"], "invalid choice: 'resnet21'"),
])
def test_an_option_the_backbone_does_not_take_is_an_error(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train_ensemble.main(argv + ["--out", str(tmp_path / "run")])
    assert info.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "run").exists()


def test_width_reaches_a_backbone_that_takes_it_and_none_other():
    """--width used to be dropped silently for vgg19 and to crash resnet18."""
    ap = train_ensemble.parser()
    assert _args.backbone_options(ap.parse_args(["--backbone", "vgg19", "--width", "8"])) == {"width": 8}
    assert _args.backbone_options(ap.parse_args(["--backbone", "resnet18"])) == {}
    assert _args.backbone_options(ap.parse_args(["--backbone", "lcresnet20", "--backbone-opt", "fused=false",
                                                 "--backbone-opt", "sharing=global"])) == {"fused": False,
                                                                                           "sharing": "global"}


def test_train_adapter_takes_backbone_options_too(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_adapter.main(["--task", "digits", "--out", str(tmp_path / "a"), "--backbone", "resnet50",
                            "--width", "4"])
    assert "backbone 'resnet50' does not take --width" in capsys.readouterr().err

    tiny = ["--task", "digits", "--slice", "Head()", "--epochs", "1", "--max-steps-per-epoch", "1", "--train-subset",
            "16", "--test-subset", "16", "--batch-size", "16", "--precise-bn", "0", "--threads", "1", "--no-progress"]
    first = train_adapter.main(tiny + ["--out", str(tmp_path / "a"), "--backbone", "vgg19", "--width", "4"])
    assert json.loads((tmp_path / "backbone.json").read_text())["arch"] == "vgg19"
    again = train_adapter.main(tiny + ["--out", str(tmp_path / "b")])  # no backbone flags: reuse the one there
    assert again["fingerprint"] == first["fingerprint"]
    capsys.readouterr()
    with pytest.raises(SystemExit):  # flags that ask for another backbone than the one there are not dropped
        train_adapter.main(tiny + ["--out", str(tmp_path / "c"), "--width", "8"])
    assert "backbone.json is {'arch': 'vgg19', 'width': 4}" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- entry points
def _run(*cmd: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_python_m_shared_backbone_help(tmp_path):
    res = _run(sys.executable, "-m", "shared_backbone", "--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for job in JOBS:
        assert job in res.stdout


def test_unknown_job_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["train-ensembel"])
    assert info.value.code == 2 and "unknown job 'train-ensembel'" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:'shared_backbone.cli.train_ensemble' found in sys.modules:RuntimeWarning")
def test_job_modules_and_script_wrappers_run_as_programs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_ensemble", "--help"])
    with pytest.raises(SystemExit) as info:  # python -m shared_backbone.cli.train_ensemble --help
        runpy.run_module("shared_backbone.cli.train_ensemble", run_name="__main__")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--backbone-opt" in out and "--l1-pointwise" in out
    script = _run(sys.executable, str(REPO / "scripts" / "train_adapter.py"), "--help", cwd=tmp_path)
    assert script.returncode == 0 and "shared-backbone train-adapter" in script.stdout


def test_console_script_is_declared_and_exits_zero(capsys):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"shared-backbone": "shared_backbone.cli:main"}
    assert cli_main(["backbones"]) == 0  # a console script exits with main()'s value: 0, not a report
    out = capsys.readouterr().out
    assert "vgg19 " in out and "width=64" in out and "in_channels" not in out
    assert cli_main(["tasks"]) == 0 and "digits" in capsys.readouterr().out


def test_bench_runs_the_checkouts_benchmark(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["bench", "--help"])
    assert info.value.code == 0 and "--only" in capsys.readouterr().out


def test_every_script_wraps_its_job():
    developer = ("bench", "gpu_check", "screen_recipes", "screen_full", "screen_joint")  # developer scripts, not jobs
    wrappers = sorted(p.stem for p in (REPO / "scripts").glob("*.py") if not p.name.startswith("_")
                      and p.stem not in developer)
    assert wrappers == sorted(m for m, _ in JOBS.values())


LAUNCH_ARGS = ["--task", "digits", "--members", "2", "--warm-start-epochs", "0", "--budget-epochs", "0",
               "--epochs", "1", "--max-steps-per-epoch", "2", "--train-subset",
               "64", "--test-subset", "32", "--batch-size", "16", "--width", "4", "--precise-bn", "0", "--ood", "none",
               "--execution", "loop", "--threads", "1", "--no-progress"]


@pytest.mark.slow
def test_the_command_runs_the_same_under_accelerate_launch_and_torchrun(tmp_path):
    """Two CPU processes, member-parallel: each launcher's run trains the members one process trains."""
    import socket

    def port() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return str(s.getsockname()[1])

    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    launchers = {
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_port", port(), "-m", "shared_backbone"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port(),
                     "-m", "shared_backbone"],
    }
    results = {}
    for name, cmd in launchers.items():
        res = subprocess.run(cmd + ["train-ensemble", *LAUNCH_ARGS, "--out", str(tmp_path / name)], env=env,
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
        assert results[name]["train"]["processes"] == 2
    one = train_ensemble.main(LAUNCH_ARGS + ["--out", str(tmp_path / "one")])
    assert one["train"]["processes"] == 1
    for r in results.values():
        assert r["metrics"]["member_accuracy"] == pytest.approx(one["metrics"]["member_accuracy"], abs=1e-6)
        assert r["fingerprint"] == one["fingerprint"]


# ----------------------------------------------------------------------------- library code does not print
def test_library_code_does_not_print():
    """Only the jobs in shared_backbone/cli/ print their reports; the library logs or warns."""
    import ast

    calls = []
    for path in sorted((REPO / "shared_backbone").rglob("*.py")):
        if "cli" in path.relative_to(REPO / "shared_backbone").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                calls.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not calls, calls


def test_progress_bars_stay_off_when_the_output_is_not_a_terminal(tiny_frozen, capsys):
    from shared_backbone import Ensemble, Head
    from shared_backbone.data import TensorData
    from shared_backbone.train import fit, predict

    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g), [0.0], [1.0])
    ens = Ensemble(tiny_frozen, Head(), members=2)
    fit(ens, data, None, TrainConfig(epochs=1, batch_size=8, augment=False), progress=True)
    predict(ens, data, progress=True)
    captured = capsys.readouterr()
    assert "epoch 1/1" not in captured.err + captured.out and "eval" not in captured.err + captured.out


# ----------------------------------------------------------------------------- the main job's recipe
def test_the_main_job_defaults_to_the_measured_recipe():
    """The default recipe: 3 epochs of budget, 2.7 of them the single model's run, 3 members of 12.5 % of the
    last block's filters + its BN + head, full data, members without label smoothing; every part a flag."""
    args = train_ensemble.parser().parse_args([])
    assert (args.members, args.budget_epochs, args.warm_start_epochs, args.schedule) == (3, 3.0, 2.7, "auto")
    assert (args.train_subset, args.test_subset, args.slice, args.member_opt) == (0, 0, None, None)
    assert train_ensemble.default_slice("resnet20", {}) == \
        "Filters(0.125, stages=['block3']) + BatchNorm(stages=['block3']) + Head()"
    assert train_ensemble.default_slice("vgg19_bn", {}).startswith("Filters(0.125, stages=['block5'])")
    ap = train_ensemble.parser()
    base = TrainConfig(label_smoothing=0.1, lr=0.05)
    members = train_ensemble.member_config(ap, base, ["label_smoothing=0", "lr=0.02", "augment=false"])
    assert (members.label_smoothing, members.lr, members.augment) == (0.0, 0.02, False)
    assert base.label_smoothing == 0.1  # the baseline's recipe is untouched


@pytest.mark.parametrize("item, message", [
    ("label_smoothing", "--member-opt takes KEY=VALUE"), ("colour=red", "--member-opt takes KEY=VALUE"),
    ("lr=fast", "--member-opt lr='fast': expected float"), ("lr=-1", "bad --member-opt: lr must be > 0"),
])
def test_a_bad_member_option_is_a_usage_error_naming_it(item, message, capsys):
    with pytest.raises(SystemExit) as info:
        train_ensemble.member_config(train_ensemble.parser(), TrainConfig(), [item])
    assert info.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("job", sorted(JOBS))
def test_help_prints_example_commands_as_written(job, capsys):
    """A ``\\``-continued example in a job's docstring stays two lines in ``-h`` (a plain docstring joins them)."""
    source = (REPO / "shared_backbone" / "cli" / f"{JOBS[job][0]}.py").read_text()
    continued = [line.strip() for line in source.split('"""')[1].splitlines() if line.endswith(" \\")]
    with pytest.raises(SystemExit):
        cli_main([job, "--help"])
    out = capsys.readouterr().out
    for line in continued:
        assert line in {o.strip() for o in out.splitlines()}, (job, line)
