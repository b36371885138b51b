#!/usr/bin/env python
"""`shared-backbone compare-peers`, run from a checkout: the job is shared_backbone/cli/compare_peers.py."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # a checkout runs its own package, installed or not
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared_backbone.cli.compare_peers import main  # noqa: E402

if __name__ == "__main__":
    main()
