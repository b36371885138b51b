"""scripts/gpu_check.py in its CI mode (--quick --device cpu): every stage runs and writes its JSON."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_quick_on_cpu_writes_every_stage(tmp_path):
    report = _load().main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk["ok"] is True and report["ok"] is True, json.dumps(on_disk["stages"], default=str)[:2000]
    st = on_disk["stages"]
    assert st["tests"]["ops"]["rc"] == 0 and " passed" in st["tests"]["ops"]["summary"][0]
    assert st["bench"]["rc"] == 0 and (tmp_path / "bench.json").is_file()
    assert st["distributed"]["ok"] is None and "skipped" in st["distributed"]
    assert st["train"]["rc"] == 0 and 0 <= st["train"]["accuracy"] <= 1 and st["train"]["train_seconds"] > 0
    assert (tmp_path / "train_results.json").is_file()
    assert {"k8_vmap_over_one_model", "loop_over_vmap"} <= set(on_disk["targets"])


def test_gpu_check_refuses_unknown_stage_and_missing_cuda(tmp_path):
    gc = _load()
    with pytest.raises(SystemExit):
        gc.main(["--stages", "nope", "--device", "cpu", "--out", str(tmp_path)])
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gc.main(["--device", "cuda", "--out", str(tmp_path)])
