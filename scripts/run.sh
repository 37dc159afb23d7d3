#!/usr/bin/env bash
# Installs what is needed and runs the server in the foreground (Ctrl+C stops it).
# With no CAN interface on this machine it plays the shipped demo capture (examples/demo.log,
# two buses, looping) so SavvyCAN or the WireTAP desktop can connect with no hardware at all.
# Arguments are passed to wiretap-server.py: flags such as --port 23 or --echo add to that
# choice, while --iface or -C choose the source themselves.
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

chooses_source() {
    local arg
    for arg in "$@"; do
        case "$arg" in --iface|--iface=*|-C|--config|--config=*) return 0 ;; esac
    done
    return 1
}

# Flags such as --echo or --port 23 add to the default choice; --iface or -C replace it.
if ! chooses_source "$@"; then
    if has_can_interface; then
        set -- -C wiretap-server.toml "$@"
    else
        echo "run: no CAN interface here, playing examples/demo.log (the server says where to connect)"
        set -- --iface replay:examples/demo.log --replay-loop --can-fd "$@"
    fi
fi
exec .venv/bin/python wiretap-server.py "$@"
