#!/bin/sh
# A throw-away local PostgreSQL with the WireTAP schema (see tests/pgcluster.py).
#   scripts/pg-dev.sh                    prints PG_DSN; Ctrl+C stops and removes the database
#   scripts/pg-dev.sh -- CMD [ARGS...]   runs CMD with PG_DSN set, then removes the database
# Example: scripts/pg-dev.sh -- .venv/bin/python wiretap-server.py --iface replay:examples/demo.log --pg-enable
set -eu
cd "$(dirname "$0")/.."
exec python3 tests/pgcluster.py "$@"
