"""The long reproduction scripts resume after an interruption: finished arms are kept, the
interrupted one continues from fit()'s checkpoint, and the result equals an uninterrupted run."""
from __future__ import annotations

import json

import pytest
import torch

from shared_backbone import data as data_mod
from shared_backbone.cli import reproduce_lc, reproduce_partial


@pytest.fixture(autouse=True)
def _stand_in(monkeypatch):
    """64 seeded random images per split instead of Fashion-MNIST; thread count restored."""
    def stand_in(card, split, *args, **kw):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        return (torch.randint(0, 256, (64, *card.input_shape), generator=g, dtype=torch.uint8),
                torch.randint(0, card.num_classes, (64,), generator=g))

    monkeypatch.setattr(data_mod, "load_arrays", stand_in)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class _Interrupt(KeyboardInterrupt):
    pass


def _interrupt_after(monkeypatch, steps: int) -> None:
    """Every optimizer step counts; the ``steps+1``-th raises, as a Ctrl-C or a killed job would."""
    real = torch.optim.SGD.step
    count = {"n": 0}

    def step(self, *a, **kw):
        count["n"] += 1
        if count["n"] > steps:
            raise _Interrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", step)


PARTIAL = ["--spec", "Head()", "--spec", "BatchNorm()+Head()", "--width", "4", "--epochs", "2", "--train-subset",
           "64", "--batch-size", "32", "--checkpoint-every", "1", "--no-progress", "--threads", "1"]


def test_partial_resumes_mid_arm_to_the_uninterrupted_result(tmp_path, monkeypatch):
    whole = reproduce_partial.main(PARTIAL + ["--out", str(tmp_path / "a.json")])
    out = tmp_path / "b.json"
    with monkeypatch.context() as m:  # 2 steps per epoch, 4 per arm: stop in the second arm's second epoch
        _interrupt_after(m, 4 + 3)
        with pytest.raises(_Interrupt):
            reproduce_partial.main(PARTIAL + ["--out", str(out), "--resume"])
    arms = tmp_path / "b_arms" / "arms"
    assert (arms / "0_Head" / "row.json").is_file()  # the first arm finished and was recorded
    assert not (arms / "1_BatchNorm_Head" / "row.json").exists()
    assert json.loads((arms / "1_BatchNorm_Head" / "checkpoint" / "state.json").read_text())["step"] == 3
    with monkeypatch.context() as m:  # the finished arm is not retrained: 1 step left to take in the other
        _interrupt_after(m, 1)
        rows = reproduce_partial.main(PARTIAL + ["--out", str(out), "--resume"])
    for r, w in zip(rows, whole, strict=True):
        assert r["spec"] == w["spec"]
        assert r["test_accuracy"] == w["test_accuracy"]
        assert r["test_nll"] == pytest.approx(w["test_nll"], abs=1e-5)


def test_resume_refuses_other_settings(tmp_path):
    out = str(tmp_path / "p.json")
    reproduce_partial.main(PARTIAL[:2] + PARTIAL[4:] + ["--out", out, "--resume"])
    args = PARTIAL[:2] + PARTIAL[4:] + ["--width", "8", "--out", out, "--resume"]
    with pytest.raises(SystemExit, match="width: 4 now 8"):
        reproduce_partial.main(args)


def test_lc_resume_keeps_finished_arms_and_their_filters(tmp_path, monkeypatch):
    import shared_backbone.lc_analysis as lca

    monkeypatch.setattr(lca, "plot_pointwise_histograms", lambda member, path: path)  # 12 s of matplotlib each
    args = ["--expansions", "1", "--width", "4", "--epochs", "1", "--batch-size", "32", "--frozen-only",
            "--learned-resnet", "--precise-bn", "0", "--no-progress", "--threads", "1", "--out", str(tmp_path),
            "--resume"]
    first = reproduce_lc.main(args)["rows"]
    assert [(r["arm"], r["backbone"], r["expansion"]) for r in first] == [
        ("learned_resnet", "resnet20", 1), ("frozen", "lcresnet20", 1)]
    (tmp_path / "arms" / "frozen_E1" / "row.json").unlink()  # as if interrupted after its last checkpoint
    with monkeypatch.context() as m:
        _interrupt_after(m, 0)  # nothing may train: one arm is done, the other is at its end checkpoint
        again = reproduce_lc.main(args)["rows"]
    assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in first]
    assert (tmp_path / "stem_filters.png").is_file() and (tmp_path / "accuracy_vs_expansion.png").is_file()


# the run.json scripts/run_long.sh's LC run wrote before the jobs moved to shared_backbone/cli (flags then
# declared by hand): a run started then must --resume with the generated flags, so the settings match it
LONG_LC = ["--paper", "--epochs", "15", "--expansions", "1,8,128", "--frozen-only", "--learned-resnet",
           "--train-subset", "0", "--test-subset", "0", "--out", "runs/lc", "--threads", "1", "--resume"]
LONG_LC_RUN_JSON = {"backbone": "lcresnet20", "width": 16, "expansions": "1,8,128", "sharing": "none",
                    "share_fraction": 0.0625, "frozen_only": True, "learned_resnet": True, "paper": True,
                    "checkpoint_every": 100, "epochs": 15, "train_subset": 0, "test_subset": 0, "batch_size": 256,
                    "lr": 0.01, "weight_decay": 0.01, "l1": 0.0, "prune": "", "precise_bn": 20, "seed": 0,
                    "prune_ratios": []}


def _lc_settings(argv):
    from shared_backbone.cli import reproduce_lc as lc

    ap = lc.parser()
    args = ap.parse_args(argv)
    if args.paper:
        lc.apply_paper(args, lc._given(argv))
    args.prune_ratios = []
    return args, lc._settings(ap, args)


def test_lc_settings_of_a_run_started_with_the_old_flags_are_unchanged():
    assert _lc_settings(LONG_LC)[1] == LONG_LC_RUN_JSON
    _, other = _lc_settings(LONG_LC + ["--label-smoothing", "0"])  # a newer flag set: checked on resume too
    assert other == {**LONG_LC_RUN_JSON, "label_smoothing": 0.0}


def test_lc_paper_gives_the_paper_recipe_unless_a_flag_overrides_it():
    from shared_backbone.train import TrainConfig

    paper = TrainConfig.paper()
    args, _ = _lc_settings(["--paper"])
    assert (args.epochs, args.batch_size, args.lr, args.weight_decay) == (75, 256, 1e-2, 1e-2)
    assert (paper.epochs, paper.batch_size, paper.lr, paper.weight_decay) == (75, 256, 1e-2, 1e-2)
    assert args.precise_bn == 20  # the job's own default, which paper() does not set
    args, _ = _lc_settings(["--paper", "--lr", "0.1", "--epochs", "3"])
    assert (args.epochs, args.batch_size, args.lr, args.weight_decay) == (3, 256, 0.1, 1e-2)
    args, _ = _lc_settings(["--lr", "0.1"])
    assert (args.epochs, args.batch_size, args.lr) == (1, TrainConfig.batch_size, 0.1)


def test_checkpoint_every_is_checked_and_declared_once(capsys):
    from shared_backbone.cli import reproduce_lc, reproduce_partial

    for job in (reproduce_lc, reproduce_partial):
        assert sum("--checkpoint-every" in a.option_strings for a in job.parser()._actions) == 1
        with pytest.raises(SystemExit):
            job.main(["--checkpoint-every", "0"])
        assert "--checkpoint-every must be a number of steps >= 1, got 0" in capsys.readouterr().err
