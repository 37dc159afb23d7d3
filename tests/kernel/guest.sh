#!/usr/bin/env bash
# Inside the VM (started by run-in-vm.sh): runs the vcan tier and leaves pytest's exit code in
# RESULTS/exit-code. The guest sees the host's filesystem read-only, except RESULTS and /tmp.
# Usage: guest.sh RESULTS PYTHON [extra pytest args | --run COMMAND ARGS...]
set -u
results=$1
python=$2
shift 2

# root's home is read-only in the guest: everything that caches goes to a scratch directory.
HOME=$(mktemp -d /tmp/home.XXXXXX)
export HOME XDG_CACHE_HOME=$HOME/.cache PYTHONDONTWRITEBYTECODE=1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

modprobe vcan
modprobe can_raw
if [ "${1:-}" = --run ]; then
    shift
    "$@"
else
    "$python" -m pytest -m vcan tests/kernel -rs "$@"
fi
echo $? >"$results/exit-code"
