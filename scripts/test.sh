#!/usr/bin/env bash
# The repo's full test command: the host tier with pytest, then the vcan tier.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --dev
.venv/bin/python -m pytest "$@"

# vcan tier (tests/kernel): real SocketCAN, in a small VM unless this kernel has vcan and we are root
tests/kernel/run-in-vm.sh
