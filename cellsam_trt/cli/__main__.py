"""``python -m cellsam_trt.cli``: the ``cellsam-trt`` command (the artefact cache starts its builds this way)."""
import sys

from .main import main

sys.exit(main())
