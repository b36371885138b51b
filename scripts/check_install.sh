#!/usr/bin/env bash
# Install check, as a new user installs: build the sdist and, from it, the wheel; install the wheel
# (not editable) into a fresh virtual environment; then, from an empty temporary folder, run the
# command's --help, load every shipped task card, and train a one-batch ensemble on `digits`.
#
#   scripts/check_install.sh            (make check-install; make test runs it after pytest)
#
# torch/torchvision come from the wheels on this machine's disk (the Makefile's pins); everything
# else from the package registries. About 2-4 minutes, most of it installing torch.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sb-install.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
unset PYTHONPATH  # only what the wheel installs may be imported
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
step() { echo "[check-install $(date +%T)] $*"; }
quiet() { "$@" >>"$WORK/log" 2>&1 || { tail -40 "$WORK/log"; echo "check-install: FAILED: $*" >&2; exit 1; }; }

step "fresh virtual environment in $WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
V="$WORK/venv/bin"
quiet "$V/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 build

step "sdist, then the wheel built from the sdist (python -m build)"
quiet "$V/python" -m build --outdir "$WORK/dist" "$ROOT"
SDIST="$(ls "$WORK"/dist/*.tar.gz)"
WHEEL="$(ls "$WORK"/dist/*.whl)"
CARDS="$(cd "$ROOT/tasks" && ls *.toml | sed 's/\.toml$//' | sort | tr '\n' ' ')"
"$V/python" - "$SDIST" "$WHEEL" $CARDS <<'EOF'
import sys, tarfile, zipfile
sdist, wheel, *cards = sys.argv[1:]
in_sdist = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
in_wheel = set(zipfile.ZipFile(wheel).namelist())
missing = [f"sdist: tasks/{c}.toml" for c in cards if f"tasks/{c}.toml" not in in_sdist]
missing += [f"wheel: shared_backbone/tasks/{c}.toml" for c in cards if f"shared_backbone/tasks/{c}.toml" not in in_wheel]
if missing:
    sys.exit(f"task cards missing from the distributions: {missing}")
print(f"  {len(cards)} cards in the sdist (tasks/) and the wheel (shared_backbone/tasks/)")
EOF

step "pip install the wheel (not editable), with the data extra (scikit-learn for digits)"
quiet "$V/python" -m pip install -q "$WHEEL[data]"

mkdir "$WORK/elsewhere" && cd "$WORK/elsewhere"
step "from $PWD: shared-backbone --help"
"$V/shared-backbone" --help >/dev/null
"$V/shared-backbone" train-ensemble --help >/dev/null
"$V/python" -m shared_backbone --help >/dev/null

step "load_task for every shipped card: $CARDS"
"$V/python" - $CARDS <<'EOF'
import sys
import shared_backbone
from shared_backbone.data import list_tasks, load_task
assert "site-packages" in shared_backbone.__file__, shared_backbone.__file__
want = sorted(sys.argv[1:])
assert list_tasks() == want, (list_tasks(), want)
for name in want:
    card = load_task(name)
    assert card.name == name, (card.name, name)
print(f"  {len(want)} cards load from {shared_backbone.__file__.rsplit('/', 1)[0]}/tasks")
EOF

step "one-batch train-ensemble on digits"
quiet "$V/shared-backbone" train-ensemble --task digits --members 2 --budget-epochs 2 --warm-start-epochs 1 --max-steps-per-epoch 1 \
    --train-subset 32 --test-subset 32 --batch-size 16 --width 4 --precise-bn 0 --ood none --threads 1 \
    --no-progress --out run
"$V/python" -c "import json; r = json.load(open('run/results.json')); assert r['task'] == 'digits' and r['members'] == 2, r"
test -d run/ensemble && test -f run/report.png
step "OK: the wheel installs and works from any folder"
