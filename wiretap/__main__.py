"""``python -m wiretap``: the same entry point as ``wiretap-server.py``."""

import sys

from wiretap.cli import main

sys.exit(main())
