"""``python -m rdc_studio.core ARGS`` runs the ``rdc`` command line (as the ``rdc`` script does)."""
import sys

from .cli import main

sys.exit(main())
