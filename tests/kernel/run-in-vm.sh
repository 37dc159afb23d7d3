#!/usr/bin/env bash
# Runs the vcan test tier (`pytest -m vcan tests/kernel`) under a Linux kernel with virtual CAN.
#
# If this machine's kernel has vcan and we may create interfaces (root), the tier runs right here.
# Otherwise it boots Debian's stock kernel in a small virtme-ng VM that shares this filesystem
# (qemu without KVM: the /dev/kvm of these machines cannot run a stock kernel) and runs the tier
# once inside it, with this repo's venv. pytest's output and exit code are passed through.
# Missing pieces are installed (Debian packages with apt-get, virtme-ng into the venv). When the
# tier cannot run it says why and exits 0, except under CI=true, where a skip is a failure.
#
# Usage: tests/kernel/run-in-vm.sh [extra pytest args]
#        tests/kernel/run-in-vm.sh --run COMMAND [ARGS...]   (e.g. tests/kernel/vcan_ceiling.py)
# Environment: WIRETAP_VENV (default .venv), WIRETAP_VM_KVM=1 to try KVM (much faster where it
# works), WIRETAP_VM_TIMEOUT seconds for the whole guest run (default 900).
set -euo pipefail

TIER="vcan tier"
source "$(dirname "$0")/../tier-common.sh"

[ -x "$python" ] || skip "no venv at $venv (scripts/test.sh creates it)"

host_has_vcan() {
    [ "$(id -u)" = 0 ] || return 1
    modprobe -q vcan 2>/dev/null || return 1
    "$python" -c 'import socket; socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)' \
        2>/dev/null
}

if host_has_vcan; then
    echo "vcan tier: this kernel has vcan, running without a VM"
    [ "${1:-}" = --run ] && shift && exec "$@"
    exec "$python" -m pytest -m vcan tests/kernel -rs "$@"
fi

# A stock kernel image whose modules include vcan.
find_kernel() {
    local image version
    for image in /boot/vmlinuz-*; do
        [ -r "$image" ] || continue
        version=${image#/boot/vmlinuz-}
        if [ -n "$(find "/lib/modules/$version" -name 'vcan.ko*' -print -quit 2>/dev/null)" ]; then
            echo "$image"
            return 0
        fi
    done
    return 1
}

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v cangen >/dev/null || missing+=(can-utils)
[ -x /bin/busybox ] || command -v busybox >/dev/null || missing+=(busybox-static)
find_kernel >/dev/null || missing+=(linux-image-amd64)
# The guest's root filesystem is read-only: PostgreSQL (for the ingest test) is installed here.
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || skip "not root, and the VM needs these Debian packages: ${missing[*]}"
    command -v apt-get >/dev/null || skip "no apt-get to install ${missing[*]}"
    echo "vcan tier: installing ${missing[*]}"
    scripts/apt-install.sh "${missing[@]}"
fi
kernel=$(find_kernel) || skip "no kernel image in /boot with a vcan module"

install_virtme_ng

results=$(mktemp -d /tmp/wiretap-vcan.XXXXXX)
trap 'rm -rf "$results"' EXIT
kvm=(--disable-kvm)
[ "${WIRETAP_VM_KVM:-0}" = 1 ] && kvm=()
guest_cmd="CI=${CI:-} $(printf '%q ' "$repo/tests/kernel/guest.sh" "$results" "$python" "$@")"

echo "vcan tier: booting $kernel in a VM (virtme-ng, qemu${kvm:+ without KVM})"
set +e
# vng's console output garbles when written straight to a file: it goes through cat.
PATH="$venv/bin:$PATH" timeout "${WIRETAP_VM_TIMEOUT:-900}" vng --run "$kernel" "${kvm[@]}" \
    --force-9p --memory 512M --rwdir "$results" --cwd "$repo" --exec "$guest_cmd" </dev/null 2>&1 |
    cat
vng_status=${PIPESTATUS[0]}
set -e

if [ ! -s "$results/exit-code" ]; then
    echo "vcan tier: FAILED: the guest did not finish the tests (vng exited $vng_status)" >&2
    exit 1
fi
exit "$(cat "$results/exit-code")"
