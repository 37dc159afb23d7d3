#!/usr/bin/env bash
# Power-cut drill for the database spool, in a VM (never on this machine: it reboots the kernel).
#
# A 64 MB disk image with ext4 holds the spool. The first boot streams frames into it with the
# database away and reboots with `echo b > /proc/sysrq-trigger` (immediate, no sync: what the
# guest's disk got is what a power cut leaves); qemu exits on that reboot (-no-reboot) and the
# image file keeps exactly what the guest had written to its disk. The second boot mounts it and
# checks the spool; the host compares it with what was fed (tests/kernel/power_cut.py).
# Same conventions as run-in-vm.sh: missing pieces are installed; a drill that cannot run says
# why and exits 0, except under CI=true.
set -euo pipefail

TIER="power-cut drill"
source "$(dirname "$0")/../tier-common.sh"

[ -x "$python" ] || skip "no venv at $venv (scripts/test.sh creates it)"
command -v qemu-system-x86_64 >/dev/null || skip "no qemu (tests/kernel/run-in-vm.sh installs it)"
command -v mkfs.ext4 >/dev/null || skip "no mkfs.ext4 (e2fsprogs)"
kernel=$(ls /boot/vmlinuz-* 2>/dev/null | head -n 1) || true
[ -n "$kernel" ] || skip "no kernel image in /boot"
install_virtme_ng

work=$(mktemp -d /tmp/wiretap-powercut.XXXXXX)
trap 'rm -rf "$work"' EXIT
truncate -s 64M "$work/disk.img"
mkfs.ext4 -q -F "$work/disk.img"
kvm=(--disable-kvm)
[ "${WIRETAP_VM_KVM:-0}" = 1 ] && kvm=()

boot() {
    # vng's console output garbles when written straight to a file: it goes through cat.
    PATH="$venv/bin:$PATH" timeout "${WIRETAP_VM_TIMEOUT:-600}" vng --run "$kernel" "${kvm[@]}" \
        --force-9p --memory 512M --rwdir "$work" --cwd "$repo" --disk "$work/disk.img" \
        --exec "$python tests/kernel/power_cut.py $1 $work /dev/sda" </dev/null 2>&1 | cat || true
}

echo "power-cut drill: first boot, streaming into the spool until the power goes"
boot stream
echo "power-cut drill: second boot, checking the spool"
boot check
"$python" tests/kernel/power_cut.py verdict "$work"
