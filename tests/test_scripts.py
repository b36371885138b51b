"""The command-line scripts and examples, run in-process with tiny arguments."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

import shared_backbone.train as train_mod
from shared_backbone import data as data_mod
from shared_backbone.saving import load_ensemble

REPO = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
have_fashion = pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _script(name: str):
    path = REPO / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _keep_threads():
    """The scripts set torch's thread count; put it back for the other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


TINY = ["--members", "2", "--epochs", "1", "--warm-start-epochs", "0", "--budget-epochs", "0",
        "--train-subset", "64", "--test-subset", "64", "--width", "4",
        "--batch-size", "32", "--ood", "none", "--no-progress", "--threads", "1"]


@have_fashion
def test_train_ensemble_script_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    report = _script("train_ensemble").main(TINY + ["--out", str(out)])

    results = json.loads((out / "results.json").read_text())
    for key in ("task", "backbone", "spec", "members", "train_size", "test_size", "fingerprint", "train",
                "params", "metrics", "execution"):
        assert key in results, key
    assert results["task"] == "fashion_mnist" and results["members"] == 2
    assert results["train_size"] == 64 and results["test_size"] == 64
    assert results["backbone_config"] == {"in_channels": 1, "num_classes": 10, "width": 4}
    assert results["execution"] in ("vmap", "loop")
    assert len(results["train"]["history"]) == 1 and results["train"]["steps"] == 2  # 64 / 32
    m = results["metrics"]
    assert len(m["member_accuracy"]) == 2 and 0 <= m["accuracy"] <= 1
    assert results["params"]["learned_all_members"] == 2 * results["params"]["learned_per_member"]
    assert report["metrics"]["accuracy"] == m["accuracy"]

    assert (out / "report.png").read_bytes()[:8] == PNG_MAGIC
    ens = load_ensemble(out / "ensemble")
    assert ens.members == 2 and ens.frozen.fingerprint == results["fingerprint"]
    assert repr(ens.spec) == results["spec"]
    printed = capsys.readouterr().out
    assert "results.json" in printed and "ensemble (mean prob)" in printed
    # the equal-cost baseline (the default --baseline single) beside it, in the file and the table
    assert results["ensemble"]["metrics"]["accuracy"] == m["accuracy"] and results["baseline"]["members"] == 1
    assert results["baseline"]["steps"] >= 1 and "1 full model" in printed

    # the saved ensemble predicts what the run measured: accuracy on the same 64 test images
    from shared_backbone.recipes import load_train_test
    from shared_backbone.train import predict

    _, test, _ = load_train_test("fashion_mnist", 64, 64, seed=0)
    logits = predict(ens, test)
    acc = (logits.softmax(-1).mean(0).argmax(-1) == test.y).float().mean().item()
    assert acc == pytest.approx(m["accuracy"])


@pytest.mark.parametrize("bad", ["Bogus()", "Filters(0.1)+", ""])
def test_train_ensemble_script_rejects_a_bad_slice(tmp_path, bad):
    with pytest.raises((SystemExit, ValueError)) as info:
        _script("train_ensemble").main(TINY + ["--slice", bad, "--out", str(tmp_path / "run")])
    msg = str(info.value)
    assert ("slice" in msg) or ("Bogus" in msg) or info.type is SystemExit and info.value.code not in (0, None)
    assert not (tmp_path / "run" / "results.json").exists()


def test_train_ensemble_script_without_data_says_how_to_get_it(tmp_path, monkeypatch):
    card_text = (REPO / "tasks" / "fashion_mnist.toml").read_text()
    empty = tmp_path / "no-data"
    empty.mkdir()
    assert 'local_dir = "/usr/share/datasets/fashion-mnist"' in card_text
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "fashion_mnist.toml").write_text(
        card_text.replace('local_dir = "/usr/share/datasets/fashion-mnist"', f'local_dir = "{empty}"'))
    monkeypatch.setenv(data_mod.TASKS_ENV, str(cards))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert data_mod.load_task("fashion_mnist").local_dir == str(empty)
    with pytest.raises(FileNotFoundError) as info:
        _script("train_ensemble").main(TINY + ["--out", str(tmp_path / "run")])
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert str(empty) in msg
    assert not (tmp_path / "run").exists() or not (tmp_path / "run" / "results.json").exists()


@have_fashion
def test_reproduce_partial_script_writes_its_table(tmp_path, capsys, monkeypatch):
    """One spec, a 64-image training subset; the test split is always the full 10,000 images."""
    out = tmp_path / "partial.json"
    rows = _script("reproduce_partial").main(
        ["--spec", "Head()", "--width", "4", "--epochs", "1", "--train-subset", "64", "--batch-size", "32",
         "--no-progress", "--threads", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and len(rows) == 1
    r = rows[0]
    assert r["spec"] == "Head()" and 0 <= r["test_accuracy"] <= 1
    assert r["learned"] == 4 * 4 * 10 + 10  # Linear(4 * width -> 10) and its bias
    assert r["learned"] < r["total"]
    assert "Head()" in capsys.readouterr().out


# ----------------------------------------------------------------------------- examples
EXAMPLES = sorted((REPO / "examples").glob("*.py"))


@pytest.mark.skipif(not EXAMPLES, reason="no examples/*.py")
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path, monkeypatch):
    """Run the example's code as written, on 32 images per split and one small step an epoch (a smoke test;
    the full example takes about a minute)."""
    real_fit, real_load_arrays = train_mod.fit, data_mod.load_arrays

    def short_fit(model, train, test=None, config=None, **kw):
        config = config or train_mod.TrainConfig()
        config = dataclasses.replace(config, epochs=1, max_steps_per_epoch=1, batch_size=min(config.batch_size, 16))
        return real_fit(model, train, test, config, **kw)

    def few_arrays(card, *args, **kw):
        try:
            images, labels = real_load_arrays(card, *args, **kw)
        except FileNotFoundError:  # Fashion-MNIST not installed (CI): 32 random images of the card's shape
            if not FASHION_DIR.is_dir() and card.dataset == "fashion_mnist":
                g = torch.Generator().manual_seed(0)
                return (torch.randint(0, 256, (32, *card.input_shape), generator=g, dtype=torch.uint8),
                        torch.randint(0, card.num_classes, (32,), generator=g))
            raise
        return images[:32], labels[:32]

    monkeypatch.setattr(train_mod, "fit", short_fit)
    monkeypatch.setattr(data_mod, "load_arrays", few_arrays)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # stay on one thread: the machine is shared
    monkeypatch.setattr(sys, "argv", [str(path)])
    runpy.run_path(str(path), run_name="__main__")


def test_reproduce_lc_trains_prunes_and_plots(tmp_path, monkeypatch, capsys):
    """Figure 1 / Figure 19 mode on 64 stand-in images: frozen arms only, recycled sharing, L1, pruning."""
    def stand_in(card, split, *args, **kw):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        return (torch.randint(0, 256, (64, *card.input_shape), generator=g, dtype=torch.uint8),
                torch.randint(0, card.num_classes, (64,), generator=g))

    monkeypatch.setattr(data_mod.sources, "load_arrays", stand_in)  # TensorData.from_card reads it there
    res = _script("reproduce_lc").main(
        ["--expansions", "1,2", "--width", "4", "--epochs", "1", "--batch-size", "32", "--sharing", "recycled",
         "--share-fraction", "0.25", "--frozen-only", "--l1", "1e-4", "--prune", "0.5,0.9", "--precise-bn", "1",
         "--no-progress", "--threads", "1", "--out", str(tmp_path)])
    rows = res["rows"]
    assert [(r["arm"], r["expansion"]) for r in rows] == [("frozen", 1), ("frozen_recycled", 1), ("frozen", 2),
                                                         ("frozen_recycled", 2)]
    for r in rows:
        assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["fgsm"]["fgsm_accuracy"] <= 1
        assert [p["ratio"] for p in r["pruned"]] == [0.5, 0.9]
        dense, half, most = (r["pruned"][0]["pointwise_bytes_dense"], r["pruned"][0]["pointwise_bytes_sparse"],
                             r["pruned"][1]["pointwise_bytes_sparse"])
        assert most < half < dense  # a sparser file really is smaller
    # recycled sharing stores fewer spatial weights than one copy per layer
    assert rows[1]["total"] < rows[0]["total"] and rows[1]["learned"] == rows[0]["learned"]
    for png in ("accuracy_vs_expansion.png", "pruning.png", "stem_filters.png", "stem_position_variance.png",
                "pointwise_histograms_E2.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC, png
    saved = json.loads((tmp_path / "accuracy_vs_expansion.json").read_text())
    assert saved["config"]["l1_pointwise"] == 1e-4 and len(saved["rows"]) == 4
    assert "after pruning rho=0.9" in capsys.readouterr().out
