"""``python -m edge_runtime.apps.validate FOLDER --out REPORT_DIR ...``: ``edge-runtime validate`` on its own."""

import sys

from edge_runtime.apps.validate.cli import main

sys.exit(main())
