#!/usr/bin/env bash
# The repo's full test command: the host tier with pytest, then the vcan tier.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --dev
.venv/bin/python -m pytest "$@"

# --- vcan tier (tests/kernel, issue 4): real SocketCAN in a VM, or here if the kernel has vcan ---
tests/kernel/run-in-vm.sh

# --- power-cut drill: the database spool across an immediate reboot, in a VM ---
tests/kernel/power-cut.sh
