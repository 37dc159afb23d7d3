#!/usr/bin/env bash
# The repo's full test command: the host tier with pytest, the vcan tier and power-cut drill in a
# VM, then the host tier again in Debian's armhf and arm64 userlands.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --dev
.venv/bin/python -m pytest "$@"

# --- vcan tier (tests/kernel, issue 4): real SocketCAN in a VM, or here if the kernel has vcan ---
tests/kernel/run-in-vm.sh

# --- power-cut drill: the database spool across an immediate reboot, in a VM ---
tests/kernel/power-cut.sh

# --- ARM tier: the host tests in Raspberry Pi OS's userlands (armhf, arm64) under qemu-user ---
tests/arm/run-arm.sh
