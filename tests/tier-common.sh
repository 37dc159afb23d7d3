# Sourced by the scripts of the test tiers that run outside pytest's own process (the vcan tier
# and the power-cut drill in a VM, the ARM tier under qemu-user). Set TIER to the tier's name
# first. Gives: the repository as the working directory, $repo, $venv and $python, and skip.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
venv=${WIRETAP_VENV:-$repo/.venv}
python=$venv/bin/python

# A tier that cannot run says why and exits 0, except under CI=true, where a skip is a failure.
skip() {
    if [ "${CI:-}" = "true" ]; then
        echo "$TIER: FAILED: cannot run it ($*), and under CI=true a skip is a failure" >&2
        exit 1
    fi
    echo "$TIER: SKIPPED: $*" >&2
    exit 0
}

# virtme-ng, which boots the VM, goes into the venv (it is not a dependency of the server).
install_virtme_ng() {
    if [ ! -x "$venv/bin/vng" ]; then
        echo "$TIER: installing virtme-ng into $venv"
        "$venv/bin/pip" install -q -r requirements-vm.txt
    fi
}
