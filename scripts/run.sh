#!/usr/bin/env bash
# Installs what is needed and runs the server in the foreground (Ctrl+C stops it).
# With no CAN interface on this machine it plays the shipped demo capture (examples/demo.log,
# two buses, looping) so SavvyCAN or the WireTAP desktop can connect with no hardware at all.
# Any arguments are passed to wiretap-server.py (e.g. --port 23, --echo, -C my.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh

has_can_interface() {
    local type
    for type in /sys/class/net/*/type; do
        # ARPHRD_CAN (include/uapi/linux/if_arp.h)
        [ "$(cat "$type" 2>/dev/null)" = 280 ] && return 0
    done
    return 1
}

if [ $# -eq 0 ] && ! has_can_interface; then
    echo "run: no CAN interface here, playing examples/demo.log (connect a GVRET client to port 2323)"
    set -- --iface replay:examples/demo.log --replay-loop --can-fd
elif [ $# -eq 0 ]; then
    set -- -C wiretap-server.toml
fi
exec .venv/bin/python wiretap-server.py "$@"
