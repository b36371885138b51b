"""Shared test set-up: offline HF, one CPU thread, tiny frozen backbones."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import shared_backbone as sb  # noqa: E402

torch.set_num_threads(1)

TINY_RESNET20 = {"width": 4, "in_channels": 1, "num_classes": 5}


def head_linear(model: torch.nn.Module) -> str:
    """The qualified name of the classifier's Linear (found by type, not by its index in the head)."""
    (name,) = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert name.startswith("stages.head.")
    return name


@pytest.fixture
def make_resnet20():
    """Factory: a resnet20 with ``TINY_RESNET20`` overridden by keyword arguments."""

    def make(**cfg):
        return sb.build_backbone("resnet20", **{**TINY_RESNET20, **cfg})

    return make


@pytest.fixture
def tiny_resnet20(make_resnet20):
    """A freshly built resnet20, width 4, 1 input channel, 5 classes (not frozen)."""
    return make_resnet20()


@pytest.fixture
def tiny_frozen(tiny_resnet20):
    """``tiny_resnet20`` frozen at seed 0 with the default init."""
    return sb.FrozenBackbone(tiny_resnet20, seed=0)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device for the tests that take the `device` fixture (tests/test_ops.py): cpu or cuda")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device ``--device`` names (default cpu); CUDA asked for but missing is an error, not a skip."""
    name = request.config.getoption("--device")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise pytest.UsageError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if name != "cpu" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {name} asked for, but torch.cuda.is_available() is False")
    return torch.device(name)
