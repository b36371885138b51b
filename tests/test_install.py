"""The package as installed, not as checked out: task cards through importlib.resources, the wheel end to end."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CARDS = sorted(p.stem for p in (REPO / "tasks").glob("*.toml"))

PROBE = """
import json, os, sys
import shared_backbone
from shared_backbone import data
from shared_backbone.data import list_tasks, load_task
cards = {n: load_task(n).name for n in list_tasks()}
print(json.dumps({"package": shared_backbone.__file__, "shipped": str(data._PACKAGE_TASKS), "cards": cards}))
"""


def _installed_layout(tmp_path: Path) -> Path:
    """What the wheel installs: the package with the top-level tasks/ copied in as shared_backbone/tasks."""
    site = tmp_path / "site"
    shutil.copytree(REPO / "shared_backbone", site / "shared_backbone", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "shared_backbone" / "tasks").mkdir()
    for card in (REPO / "tasks").glob("*.toml"):
        shutil.copy(card, site / "shared_backbone" / "tasks" / card.name)
    return site


def _probe(site: Path, cwd: Path, **env) -> dict:
    import json

    full = {k: v for k, v in os.environ.items() if k != "SHARED_BACKBONE_TASKS"}
    full.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env)
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=full, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_an_installed_package_finds_its_cards_from_any_folder(tmp_path):
    """No checkout around (no pyproject.toml beside the package): the cards come from inside the package,
    found through importlib.resources, whatever the working folder; a user's folder still comes first."""
    site = _installed_layout(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = _probe(site, elsewhere)
    assert Path(got["package"]).parent == site / "shared_backbone"
    assert Path(got["shipped"]) == site / "shared_backbone" / "tasks"
    assert got["cards"] == {n: n for n in CARDS}

    mine = tmp_path / "my_cards"
    mine.mkdir()
    text = (REPO / "tasks" / "digits.toml").read_text()
    assert 'name = "digits"' in text
    (mine / "digits.toml").write_text(text.replace('name = "digits"', 'name = "my_digits"'))
    got = _probe(site, elsewhere, SHARED_BACKBONE_TASKS=str(mine))
    assert got["cards"]["digits"] == "my_digits"  # $SHARED_BACKBONE_TASKS first, then the shipped cards
    assert got["cards"]["mnist5k"] == "mnist5k"


def test_a_checkout_uses_its_own_top_level_cards():
    from shared_backbone import data

    assert data._PACKAGE_TASKS == REPO / "tasks"
    assert set(CARDS) <= set(data.list_tasks())


@pytest.mark.slow
def test_the_wheel_installs_and_runs_from_any_folder():
    """scripts/check_install.sh (also run by `make test`): sdist, wheel, fresh venv, --help, every card, one batch."""
    res = subprocess.run(["bash", str(REPO / "scripts" / "check_install.sh")], capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "OK: the wheel installs and works from any folder" in res.stdout


def test_every_subpackage_is_listed_for_the_wheel():
    """pyproject lists packages by hand (for the tasks/ mapping): a new subpackage must be listed there."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "shared_backbone").rglob("__init__.py")}
    assert on_disk - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(on_disk - listed)}"


def test_the_version_has_one_source():
    """pyproject reads the version from shared_backbone/_version.py, the module every file-writer imports it from
    (not the package's __init__), so the wheel's metadata, ``__version__`` and saved files cannot disagree."""
    import tomllib

    from setuptools.config.pyprojecttoml import read_configuration

    import shared_backbone
    from shared_backbone import _version

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert read_configuration(root / "pyproject.toml")["project"]["version"] == _version.__version__
    assert shared_backbone.__version__ is _version.__version__
    frozen = shared_backbone.FrozenBackbone(shared_backbone.build_backbone("resnet20", width=4), seed=0)
    assert frozen.config["library_version"] == _version.__version__
