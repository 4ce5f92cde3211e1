"""``python -m inspection_audit.cli``: the same as the ``inspection-audit`` script."""

import sys

from inspection_audit.cli import main

sys.exit(main())
