"""``python -m phantom``: see :func:`phantom.cli.main`."""

import sys

from phantom.cli import main

sys.exit(main())
