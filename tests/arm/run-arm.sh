#!/usr/bin/env bash
# Runs the host test tier in the userlands Raspberry Pi OS is built from: Debian bookworm armhf
# (32-bit time_t), trixie armhf (64-bit time_t) and trixie arm64, each a root file system made by
# debootstrap from Debian's own packages and run by qemu-user through binfmt_misc. The three run
# at once, each into its own log: most of a test's time is waiting, and one after the other they
# take about 11 minutes on two cores.
#
# qemu-aarch64 emulates a Cortex-A72, a Raspberry Pi 4's core. Its default CPU ("max") has
# pointer authentication, which Debian's arm64 binaries use on every function return and which
# qemu 7.2 computes with the QARMA cipher in software: Python runs about 25 times slower there.
#
# Not run there: the tests marked pg (they need the throw-away PostgreSQL server, which is not what
# is under test; the writer's pure parts and the spool run in every tier) and tests/kernel (they
# need a CAN kernel: tests/kernel/run-in-vm.sh). Python, psycopg2, pytest
# and hypothesis come from each release's Debian packages, as a Raspberry Pi would have them.
#
# The file systems are kept in $WIRETAP_ARM_CACHE (default /var/cache/wiretap-arm) and made again
# only when the package list below changes: about 4 minutes each the first time, then nothing.
# When the tier cannot run it says why and exits 0, except under CI=true, where a skip is a failure.
#
# Usage: tests/arm/run-arm.sh [extra pytest args]
# Environment: WIRETAP_ARM_TARGETS (default "bookworm:armhf trixie:armhf trixie:arm64"),
# WIRETAP_ARM_MIRROR (default: the first Debian archive this machine's apt sources name).
set -euo pipefail

TIER="arm tier"
source "$(dirname "$0")/../tier-common.sh"
cache=${WIRETAP_ARM_CACHE:-/var/cache/wiretap-arm}
targets=${WIRETAP_ARM_TARGETS:-"bookworm:armhf trixie:armhf trixie:arm64"}
packages=python3,python3-psycopg2,python3-pytest,python3-hypothesis,iproute2

[ "$(id -u)" = 0 ] || skip "not root (debootstrap, chroot and binfmt_misc need it)"

missing=()
command -v qemu-arm-static >/dev/null || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || skip "no apt-get to install ${missing[*]}"
    echo "arm tier: installing ${missing[*]}"
    scripts/apt-install.sh "${missing[@]}"
fi

# The Debian archive this machine installs from (not its security archive).
mirror=${WIRETAP_ARM_MIRROR:-$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
    grep -v '^[[:space:]]*#' | grep -o 'https\?://[^[:space:]]*' | grep -v security | head -1 || true)}
[ -n "$mirror" ] || skip "no Debian archive in this machine's apt sources (set WIRETAP_ARM_MIRROR)"

# binfmt_misc is what lets an ARM binary (and every subprocess a test starts) run here.
[ -e /proc/sys/fs/binfmt_misc/register ] ||
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null ||
    skip "binfmt_misc cannot be mounted here"
for emulator in qemu-arm qemu-aarch64; do
    [ -e "/proc/sys/fs/binfmt_misc/$emulator" ] || update-binfmts --enable "$emulator" ||
        skip "cannot register $emulator with binfmt_misc"
done

# The checkout's files, committed or not (CI runs a fresh clone, a developer their work tree).
source_tar=$(mktemp /tmp/wiretap-arm-src.XXXXXX)
trap 'rm -f "$source_tar"' EXIT
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf "$source_tar"

# Black-holes a peer with `ip rule`, which qemu-user cannot pass on: it translates rtnetlink's
# link, address and route messages only, and answers a rule with "Operation not supported". What
# it tests is the kernel's TCP, the same on every platform.
dead_peer=tests/test_hostile.py::test_a_peer_that_vanishes_is_dropped_and_its_place_freed

# Makes (once) and fills the root file system of one target, then runs the tier in it.
run_target() {
    local suite=$1 arch=$2
    shift 2
    local root=$cache/$suite-$arch
    if [ "$(cat "$root/.wiretap-packages" 2>/dev/null)" != "$packages" ]; then
        echo "arm tier: building $suite $arch with debootstrap (once; kept in $root)"
        rm -rf "$root.new"
        if ! debootstrap --arch="$arch" --variant=minbase --include="$packages" "$suite" \
            "$root.new" "$mirror" >"$cache/$suite-$arch.log" 2>&1; then
            tail -20 "$cache/$suite-$arch.log"
            echo "arm tier: FAILED: debootstrap $suite $arch"
            return 1
        fi
        echo "$packages" >"$root.new/.wiretap-packages"
        rm -rf "$root"
        mv "$root.new" "$root"
    fi
    rm -rf "$root/work" && mkdir -p "$root/work/wiretap"
    tar -xf "$source_tar" -C "$root/work/wiretap"

    echo "arm tier: $suite $arch: $(chroot "$root" python3 -c 'import platform, sys
print(platform.machine(), "Python", platform.python_version())')"
    # A private mount namespace: /proc, /sys and /dev leave with the process, whatever happens.
    dead_peer=$dead_peer unshare --mount --propagation private sh -c '
        root=$1; shift
        mount -t proc proc "$root/proc" && mount -t sysfs sysfs "$root/sys" &&
            mount --rbind /dev "$root/dev" &&
            exec chroot "$root" env -C /work/wiretap HOME=/root python3 -m pytest -q \
                -p no:cacheprovider -m "not vcan and not pg" --ignore=tests/kernel \
                --deselect "$dead_peer" "$@"
    ' sh "$root" "$@"
}

mkdir -p "$cache"
pids=()
for target in $targets; do
    IFS=: read -r suite arch <<<"$target"
    (
        [ "$arch" = arm64 ] && export QEMU_CPU=cortex-a72
        run_target "$suite" "$arch" "$@"
    ) >"$cache/$suite-$arch.run.log" 2>&1 &
    pids+=("$target=$!")
done
echo "arm tier: running $targets at once; their logs are in $cache/*.run.log"

status=0
for entry in "${pids[@]}"; do
    target=${entry%=*}
    log=$cache/${target/:/-}.run.log
    if wait "${entry##*=}"; then
        grep -E '^arm tier: | passed' "$log" | paste -sd ' ' -
    else
        cat "$log"
        echo "arm tier: FAILED on $target" >&2
        status=1
    fi
done
exit $status
