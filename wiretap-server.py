#!/usr/bin/env python3
"""WireTAP Server entry point: ``./wiretap-server.py -C wiretap-server.toml`` (see ``--help``).

Runs from a checkout without installing: the package next to this file is put on ``sys.path``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))

from wiretap.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
