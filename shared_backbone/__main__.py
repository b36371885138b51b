"""``python -m shared_backbone JOB ...``: the ``shared-backbone`` command (see :mod:`shared_backbone.cli`)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
