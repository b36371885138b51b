"""The task cards in tasks/: every shipped card, relabelling, hub cards on local stand-ins, imagefolder."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from shared_backbone import data as sbd
from shared_backbone.data import TaskCard, TensorData, list_tasks, load_arrays, load_dataset_for, load_task

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SHIPPED = {"fashion_mnist": 10, "mnist5k": 10, "digits": 10, "fashion_coarse": 4, "cifar10": 10, "cifar100": 100,
           "svhn": 10, "imagefolder": 2}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    sbd.clear_cache()


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_card_loads(name):
    card = load_task(name)
    assert name in list_tasks() and card.name == name
    assert card.num_classes == SHIPPED[name] == len(card.class_names) == len(set(card.class_names))
    assert len(card.mean) == len(card.std) == card.input_shape[0]
    assert card == load_task(Path(sbd._PACKAGE_TASKS) / f"{name}.toml")


def test_hub_cards_name_their_hub_dataset():
    assert load_task("cifar100").hub_id == "uoft-cs/cifar100" and load_task("cifar100").label_column == "fine_label"
    svhn = load_task("svhn")
    assert (svhn.hub_id, svhn.hub_config, svhn.hflip) == ("ufldl-stanford/svhn", "cropped_digits", False)


# ----------------------------------------------------------------------------- fashion_coarse
def _write_idx(path: Path, arr: np.ndarray) -> None:
    payload = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(payload + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()))


def test_fashion_coarse_relabels_a_local_standin(tmp_path):
    fine = np.arange(20) % 10
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((20, 28, 28), np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", fine)
    card = load_task("fashion_coarse")
    _, labels = load_arrays(card, "train", source="local", data_dir=tmp_path)
    assert labels.tolist() == [card.label_map[i] for i in fine]
    names = [card.class_names[i] for i in labels[:10]]
    assert names == ["tops", "bottoms", "tops", "tops", "tops", "footwear", "tops", "footwear", "bags", "footwear"]
    ds = load_dataset_for(card, "test", source="local", data_dir=tmp_path)
    assert ds.features["label"].names == ["tops", "bottoms", "footwear", "bags"]


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_coarse_on_the_real_test_split():
    _, labels = load_arrays(load_task("fashion_coarse"), "test")
    assert torch.bincount(labels).tolist() == [5000, 1000, 3000, 1000]


# ----------------------------------------------------------------------------- hub cards, offline
def _standin(card: TaskCard, n: int = 6):
    """A small in-memory hub dataset with the card's own column names and PIL images."""
    import datasets
    from PIL import Image

    c, h, w = card.input_shape
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    images = [Image.fromarray(a if c == 3 else a[..., 0]) for a in arrays]
    labels = [i % card.num_classes for i in range(n)]
    features = datasets.Features({card.image_column: datasets.Image(),
                                  card.label_column: datasets.ClassLabel(names=list(card.class_names))})
    ds = datasets.Dataset.from_dict({card.image_column: images, card.label_column: labels}, features=features)
    return ds, arrays.transpose(0, 3, 1, 2), labels


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_hub_cards_load_through_datasets_on_a_local_standin(name, monkeypatch):
    import datasets

    card = load_task(name)
    ds, arrays, labels = _standin(card)
    calls = []

    def fake_load_dataset(path, split=None, name=None, **kw):
        calls.append((path, name, split))
        return ds

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(sbd.sources, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    images, got = load_arrays(card, "train", source="hub")
    assert calls == [(card.hub_id, card.hub_config or None, "train")]
    assert images.shape == (6, *card.input_shape) and torch.equal(images, torch.from_numpy(arrays))
    assert got.tolist() == labels
    data = TensorData.from_card(card, "train", source="hub")
    assert data.x.shape == (6, 3, 32, 32) and data.hflip == card.hflip


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_hub_cards_offline_say_how_to_get_the_data(name):
    card = load_task(name)
    with pytest.raises(FileNotFoundError, match=card.hub_id):
        load_arrays(card, "train")
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):
        load_arrays(card, "train", source="hub")


# ----------------------------------------------------------------------------- imagefolder
def _image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size=(40, 36), mode="RGB") -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"{i}.png")
    return root


def test_imagefolder_card_reads_a_folder_of_pngs(tmp_path):
    root = _image_folder(tmp_path / "pets")
    card = load_task("imagefolder")
    images, labels = load_arrays(card, "train", data_dir=root)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8  # resized to the card's shape
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    from PIL import Image

    with Image.open(root / "train" / "dog" / "0.png") as im:
        want = np.array(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert torch.equal(images[3], torch.from_numpy(want))
    test = TensorData.from_card(card, "test", data_dir=root)
    assert len(test) == 6 and test.x.shape[1:] == (3, 32, 32)


def test_a_user_card_for_a_grayscale_folder_needs_no_code(tmp_path, monkeypatch):
    root = _image_folder(tmp_path / "shapes", classes=("circle", "square", "star"), per_class=2, size=(28, 28),
                         mode="L")
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "shapes.toml").write_text(f"""
name = "shapes"
dataset = "imagefolder"
local_dir = "{root}"
num_classes = 3
class_names = ["circle", "square", "star"]
input_shape = [1, 28, 28]
mean = [0.5]
std = [0.29]
""")
    monkeypatch.setenv(sbd.TASKS_ENV, str(cards))
    card = load_task("shapes")
    images, labels = load_arrays(card, "test")
    assert images.shape == (6, 1, 28, 28) and labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagefolder_errors_name_the_problem(tmp_path):
    card = load_task("imagefolder")
    root = _image_folder(tmp_path / "three", classes=("cat", "dog", "fox"), per_class=1)
    with pytest.raises(ValueError, match=r"\['cat', 'dog', 'fox'\] \(3 classes\).*num_classes=2"):
        load_arrays(card, "train", data_dir=root)
    with pytest.raises(FileNotFoundError, match="no folder"):
        load_arrays(card, "train", data_dir=tmp_path / "nowhere")
    bad = _image_folder(tmp_path / "bad", per_class=1)
    (bad / "train" / "cat" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_arrays(card, "train", data_dir=bad)


# ----------------------------------------------------------------------------- bad cards
BASE = dict(name="t", dataset="mnist5k", num_classes=2, class_names=["a", "b"], input_shape=[1, 28, 28],
            mean=[0.1], std=[0.3], split_sizes={"train": 4, "test": 2})


@pytest.mark.parametrize("change, message", [
    ({"dataset": "nonesuch", "split_sizes": {}}, "dataset 'nonesuch' is unknown: it has no source"),
    ({"num_classes": 3}, "num_classes=3 but 2 class_names"),
    ({"label_map": [0, 1, 2]}, "label_map values must be class indices 0..1"),
    ({"num_classes": 3, "class_names": ["a", "b", "c"], "label_map": [0, 1, 1]}, r"never maps to class\(es\) \[2\]"),
])
def test_bad_cards_are_clear_errors(change, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        TaskCard.from_dict({**BASE, **change})
    lines = [f"{k} = {_toml(v)}" for k, v in {**BASE, **change}.items() if not isinstance(v, dict)]
    sizes = {**BASE, **change}["split_sizes"]
    f = tmp_path / "bad.toml"
    f.write_text("\n".join(lines) + "\n[split_sizes]\n" + "".join(f"{k} = {v}\n" for k, v in sizes.items()))
    with pytest.raises(ValueError, match=message):
        load_task(f)


def _toml(v) -> str:
    return repr(v).replace("'", '"') if not isinstance(v, str) else f'"{v}"'


def test_labels_beyond_the_label_map_are_refused(tmp_path):
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.array([0, 11, 2]))
    with pytest.raises(ValueError, match="label_map has 10 entries"):
        load_arrays(load_task("fashion_coarse"), "train", source="local", data_dir=tmp_path)
