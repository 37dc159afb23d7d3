#!/usr/bin/env bash
# The repo's full test command: the host tier with pytest, the vcan tier and power-cut drill in a
# VM, then the host tier again in Debian's armhf and arm64 userlands.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --dev
.venv/bin/python -m pytest "$@"

# vcan tier (tests/kernel): real SocketCAN, in a small VM unless this kernel has vcan and we are root
tests/kernel/run-in-vm.sh

# --- power-cut drill: the database spool across an immediate reboot, in a VM ---
tests/kernel/power-cut.sh

# --- ARM tier: the host tests in Raspberry Pi OS's userlands (armhf, arm64) under qemu-user ---
tests/arm/run-arm.sh
