"""The long reproduction scripts resume after an interruption: finished arms are kept, the
interrupted one continues from fit()'s checkpoint, and the result equals an uninterrupted run."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from shared_backbone import data as data_mod

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    path = REPO / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    whole = _script("reproduce_partial").main(PARTIAL + ["--out", str(tmp_path / "a.json")])
    out = tmp_path / "b.json"
    with monkeypatch.context() as m:  # 2 steps per epoch, 4 per arm: stop in the second arm's second epoch
        _interrupt_after(m, 4 + 3)
        with pytest.raises(_Interrupt):
            _script("reproduce_partial").main(PARTIAL + ["--out", str(out), "--resume"])
    arms = tmp_path / "b_arms" / "arms"
    assert (arms / "0_Head" / "row.json").is_file()  # the first arm finished and was recorded
    assert not (arms / "1_BatchNorm_Head" / "row.json").exists()
    assert json.loads((arms / "1_BatchNorm_Head" / "checkpoint" / "state.json").read_text())["step"] == 3
    with monkeypatch.context() as m:  # the finished arm is not retrained: 1 step left to take in the other
        _interrupt_after(m, 1)
        rows = _script("reproduce_partial").main(PARTIAL + ["--out", str(out), "--resume"])
    for r, w in zip(rows, whole, strict=True):
        assert r["spec"] == w["spec"]
        assert r["test_accuracy"] == w["test_accuracy"]
        assert r["test_nll"] == pytest.approx(w["test_nll"], abs=1e-5)


def test_resume_refuses_other_settings(tmp_path):
    out = str(tmp_path / "p.json")
    _script("reproduce_partial").main(PARTIAL[:2] + PARTIAL[4:] + ["--out", out, "--resume"])
    args = PARTIAL[:2] + PARTIAL[4:] + ["--width", "8", "--out", out, "--resume"]
    with pytest.raises(SystemExit, match="width: 4 now 8"):
        _script("reproduce_partial").main(args)


def test_lc_resume_keeps_finished_arms_and_their_filters(tmp_path, monkeypatch):
    import shared_backbone.lc_analysis as lca

    monkeypatch.setattr(lca, "plot_pointwise_histograms", lambda member, path: path)  # 12 s of matplotlib each
    args = ["--expansions", "1", "--width", "4", "--epochs", "1", "--batch-size", "32", "--frozen-only",
            "--learned-resnet", "--precise-bn", "0", "--no-progress", "--threads", "1", "--out", str(tmp_path),
            "--resume"]
    first = _script("reproduce_lc").main(args)["rows"]
    assert [(r["arm"], r["backbone"], r["expansion"]) for r in first] == [
        ("learned_resnet", "resnet20", 1), ("frozen", "lcresnet20", 1)]
    (tmp_path / "arms" / "frozen_E1" / "row.json").unlink()  # as if interrupted after its last checkpoint
    with monkeypatch.context() as m:
        _interrupt_after(m, 0)  # nothing may train: one arm is done, the other is at its end checkpoint
        again = _script("reproduce_lc").main(args)["rows"]
    assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in first]
    assert (tmp_path / "stem_filters.png").is_file() and (tmp_path / "accuracy_vs_expansion.png").is_file()
