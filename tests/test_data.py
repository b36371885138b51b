"""Tests for shared_backbone.data: task cards, IDX parsing, sources, batched augmentation."""
from __future__ import annotations

import gzip
import struct
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared_backbone import data as sbd
from shared_backbone.data import (
    TensorData, augment_batch, load_arrays, load_dataset_for, load_task, random_crop,
    random_hflip, read_idx,
)

torch.set_num_threads(2)
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    sbd.clear_cache()


def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> Path:
    """Minimal IDX writer (uint8 only): magic 0x0000 0x08 ndim, big-endian uint32 dims, raw bytes."""
    payload = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload += np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def make_fashion_standin(root: Path, n_train: int = 12, n_test: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
        out[prefix] = (x, y)
    return out


# ----------------------------------------------------------------------------- cards
def test_shipped_cards_load():
    assert {"fashion_mnist", "mnist5k", "digits", "cifar10"} <= set(sbd.list_tasks())
    card = load_task("fashion_mnist")
    assert card.num_classes == 10 and card.class_names[0] == "T-shirt/top" and card.class_names[-1] == "Ankle boot"
    assert card.input_shape == (1, 28, 28) and card.mean == (0.2860,) and card.std == (0.3530,)
    assert card.hflip and card.crop_padding in (2, 4)
    cifar = load_task("cifar10")
    assert cifar.input_shape == (3, 32, 32) and cifar.hub_id == "uoft-cs/cifar10" and not cifar.local_files


def test_card_validation_errors():
    base = load_task("fashion_mnist")
    with pytest.raises(ValueError, match="num_classes=10 but 9 class_names"):
        replace(base, class_names=base.class_names[:9])
    with pytest.raises(ValueError, match="one value per channel"):
        replace(base, mean=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="input_shape"):
        replace(base, input_shape=(1, 0, 28))
    with pytest.raises(ValueError, match="unknown augmentation.*accepted"):
        replace(base, augmentation={"rotate": 10})
    with pytest.raises(ValueError, match="has no source"):
        replace(base, hub_id="", local_files={})


def test_unknown_card_lists_available():
    with pytest.raises(ValueError, match="unknown task card 'nope'.*fashion_mnist"):
        load_task("nope")


def test_card_from_path_and_env_dir(tmp_path, monkeypatch):
    text = Path(sbd._PACKAGE_TASKS / "mnist5k.toml").read_text().replace('name = "mnist5k"', 'name = "mine"')
    (tmp_path / "mine.toml").write_text(text)
    assert load_task(tmp_path / "mine.toml").name == "mine"
    monkeypatch.setenv("SHARED_BACKBONE_TASKS", str(tmp_path))
    assert load_task("mine").name == "mine" and "mine" in sbd.list_tasks()
    (tmp_path / "bad.toml").write_text('colour = "red"\n' + text)
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        load_task("bad")


# ----------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(write_idx(tmp_path / "a.idx", arr, compress))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4) and np.array_equal(out, arr)


def test_read_idx_truncated_and_corrupt(tmp_path):
    arr = np.zeros((5, 28, 28), dtype=np.uint8)
    plain = write_idx(tmp_path / "x.idx", arr, compress=False)
    cut = tmp_path / "cut.idx"
    cut.write_bytes(plain.read_bytes()[:-10])
    with pytest.raises(ValueError, match="cut.idx.*truncated"):
        read_idx(cut)
    gz = write_idx(tmp_path / "x.gz", arr).read_bytes()
    (tmp_path / "cut.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(ValueError, match="cut.gz"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "junk.idx").write_bytes(b"\x12\x34\x56\x78" + bytes(16))
    with pytest.raises(ValueError, match="junk.idx.*magic"):
        read_idx(tmp_path / "junk.idx")


# ----------------------------------------------------------------------------- sources
def test_load_arrays_local_standin(tmp_path):
    ref = make_fashion_standin(tmp_path)
    card = load_task("fashion_mnist")
    x, y = load_arrays(card, "train", source="local", data_dir=tmp_path)
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], torch.from_numpy(ref["train"][0])) and torch.equal(y, torch.from_numpy(ref["train"][1]).long())
    assert load_arrays(card, "train", source="local", data_dir=tmp_path)[0] is x  # cached
    ds = load_dataset_for(card, "test", source="auto", data_dir=tmp_path)
    assert ds.num_rows == 6 and ds.features["label"].names[1] == "Trouser"
    item = ds.with_format("numpy")[0]
    assert np.array_equal(item["image"][0], ref["t10k"][0][0])
    td = TensorData.from_card(card, "test", source="local", data_dir=tmp_path)
    assert td.x.dtype == torch.float32 and torch.allclose(td.x[0, 0, 0, 0], (torch.tensor(ref["t10k"][0][0, 0, 0] / 255.0, dtype=torch.float32) - 0.2860) / 0.3530)


def test_load_arrays_bad_labels(tmp_path):
    make_fashion_standin(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(12, 10, dtype=np.uint8))
    with pytest.raises(ValueError, match="labels span 10..10"):
        load_arrays(load_task("fashion_mnist"), "train", source="local", data_dir=tmp_path)


def test_missing_local_data_says_how_to_get_it(tmp_path):
    card = replace(load_task("fashion_mnist"), local_dir=str(tmp_path / "absent"))
    for source in ("local", "auto"):
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
            load_arrays(card, "train", source=source)
        assert "zalando-datasets/fashion_mnist" in str(err.value)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_arrays(card, "val")


def test_hub_offline_is_quick_clear_error(monkeypatch):
    card = load_task("cifar10")
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="uoft-cs/cifar10.*HF_HUB_OFFLINE"):
        load_arrays(card, "train", source="hub")
    with pytest.raises(FileNotFoundError, match="go online"):
        load_arrays(card, "train", source="auto")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConnectionError):
        load_arrays(card, "test", source="hub")
    assert time.perf_counter() - start < 2.0


def test_hub_conversion_on_local_standin(monkeypatch):
    """The hub path end to end, with datasets.load_dataset replaced by a small local PIL dataset."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    fake = datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in arrays], "label": [0, 3, 9, 1, 2]}, features=feats)
    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(sbd.sources, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split, **kw: calls.append((hub_id, split)) or fake)
    x, y = load_arrays(load_task("cifar10"), "test", source="auto")
    assert calls == [("uoft-cs/cifar10", "test")]
    assert x.shape == (5, 3, 32, 32) and torch.equal(x, torch.from_numpy(arrays).permute(0, 3, 1, 2))
    assert y.tolist() == [0, 3, 9, 1, 2]


def test_mnist5k_and_digits():
    x, y = sbd.mnist5k()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.uint8 and y.shape == (5000,) and set(y.tolist()) == set(range(10))
    d, t = sbd.sklearn_digits()
    assert d.shape == (1797, 1, 28, 28) and d.dtype == torch.uint8 and int(d.max()) > 200 and t.shape == (1797,)
    assert sbd.sklearn_digits(size=8)[0].shape == (1797, 1, 8, 8)
    card = load_task("mnist5k")
    tr, te = load_arrays(card, "train"), load_arrays(card, "test")
    assert tr[0].shape == (4000, 1, 28, 28) and te[0].shape == (1000, 1, 28, 28)
    assert set(tr[1].tolist()) == set(range(10)) and set(te[1].tolist()) == set(range(10))
    dig = load_task("digits")
    assert load_arrays(dig, "train")[0].shape[0] + load_arrays(dig, "test")[0].shape[0] == 1797


@pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    x, y = load_arrays(load_task("fashion_mnist"), "test", source="local")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.min() == 0 and y.max() == 9 and y.bincount().tolist() == [1000] * 10


# ----------------------------------------------------------------------------- augmentation
def reference_crop(x: torch.Tensor, padding: int, offsets: torch.Tensor, fill: float) -> torch.Tensor:
    out = []
    for img, (dy, dx) in zip(x, offsets.tolist()):
        p = F.pad(img, (padding,) * 4, value=fill)
        out.append(p[:, dy : dy + img.shape[1], dx : dx + img.shape[2]])
    return torch.stack(out)


def test_random_crop_matches_per_sample_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 9, 7, generator=g)
    offsets = torch.randint(0, 9, (16, 2), generator=g)
    out = random_crop(x, 4, offsets=offsets, fill=-0.5)
    assert out.shape == x.shape
    assert torch.equal(out, reference_crop(x, 4, offsets, -0.5))
    assert random_crop(x, 4, generator=g).shape == x.shape


def test_random_crop_shifts_known_image():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 5] = 1.0
    p, dy, dx = 2, 4, 1  # output pixel (i, j) = input pixel (i + dy - p, j + dx - p)
    out = random_crop(x, p, offsets=torch.tensor([[dy, dx]]))
    assert out.nonzero().tolist() == [[0, 0, 3 - dy + p, 5 - dx + p]]


def test_augment_identity_and_flip():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 6, 6, generator=g)
    assert torch.equal(augment_batch(x, crop_padding=0, hflip=False, generator=g), x)
    out = augment_batch(x, crop_padding=0, hflip=True, generator=g)
    same = (out == x).flatten(1).all(1)
    flipped = (out == torch.flip(x, dims=[-1])).flatten(1).all(1)
    assert (same | flipped).all() and same.any() and flipped.any()
    mask = torch.tensor([True, False] * 32)
    assert torch.equal(random_hflip(x, mask=mask)[mask], torch.flip(x[mask], dims=[-1]))


def test_tensordata_batches_subset_bootstrap():
    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(50) % 10
    images[:, 0, 0, 0] = torch.arange(50, dtype=torch.uint8)  # tag each row
    td = TensorData.from_uint8(images, labels, mean=[0.5], std=[0.25], crop_padding=2, hflip=True)
    assert torch.allclose(td.fill, torch.tensor([-2.0]))
    g = torch.Generator().manual_seed(0)
    batches = list(td.batches(16, shuffle=True, generator=g, augment=True))
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]
    assert all(b[0].shape[1:] == (1, 8, 8) for b in batches)
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == sorted(labels.tolist())
    assert len(list(td.batches(16, drop_last=True))) == 3
    plain = torch.cat([b[0] for b in td.batches(16, shuffle=False)])
    assert torch.equal(plain, td.x)
    sub = td.subset(20, seed=3)
    assert len(sub) == 20
    assert torch.equal(td.subset(20, seed=3).y, sub.y)
    assert sub.x[:, 0, 0, 0].unique().numel() == 20  # without replacement
    boot = td.bootstrap(torch.Generator().manual_seed(0))
    assert len(boot) == 50 and boot.crop_padding == 2 and boot.hflip
    assert boot.x[:, 0, 0, 0].unique().numel() < 50  # with replacement: repeats
    with pytest.raises(ValueError, match="subset size"):
        td.subset(51)
    assert td.to("cpu").x.device.type == "cpu"
