#!/usr/bin/env bash
# Installs Debian packages with apt-get, waiting for another package manager to finish first.
# A Raspberry Pi that has just booted often runs unattended-upgrades, and apt-get fails at once
# while it holds the dpkg lock: this waits for the lock (and says so), up to WIRETAP_APT_WAIT
# seconds (default 600). Installed packages are never upgraded. The package lists are only
# refreshed (apt-get update) when an install fails without it.
#   scripts/apt-install.sh PACKAGE...
set -euo pipefail
wait_s=${WIRETAP_APT_WAIT:-600}
apt_options=(-y -qq --no-install-recommends --no-upgrade -o "DPkg::Lock::Timeout=$wait_s")

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# Prints "PATH held by process PID (NAME)" for the first apt/dpkg lock another process holds;
# fails when none is held. apt-get update does not wait for its lock even with
# DPkg::Lock::Timeout (apt 2.6), hence this check for all of them.
lock_holder() {
    as_root python3 - /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock \
        /var/cache/apt/archives/lock <<'EOF'
import fcntl, os, struct, sys

for path in sys.argv[1:]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        continue
    # struct flock (fcntl(2)): l_type, l_whence, l_start, l_len, l_pid; F_GETLK asks who holds it.
    query = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0)
    try:
        l_type, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        continue
    finally:
        os.close(fd)
    if l_type != fcntl.F_UNLCK:
        try:
            with open(f"/proc/{pid}/comm") as comm:
                who = f"process {pid} ({comm.read().strip()})"
        except OSError:
            who = "another process"
        print(f"{path} held by {who}")
        sys.exit(0)
sys.exit(1)
EOF
}

wait_for_lock() {
    local holder waited=0
    while holder=$(lock_holder); do
        if [ "$waited" = 0 ]; then
            echo "install: another package manager is at work ($holder): waiting up to ${wait_s}s"
        fi
        if [ "$waited" -ge "$wait_s" ]; then
            echo "install: gave up after ${wait_s}s: $holder (set WIRETAP_APT_WAIT to wait longer)" >&2
            exit 1
        fi
        sleep 2
        waited=$((waited + 2))
    done
    if [ "$waited" != 0 ]; then echo "install: the package manager is free, going on"; fi
}

apt_install() {
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install "${apt_options[@]}" "$@" >/dev/null
}

echo "install: apt-get install $*"
wait_for_lock
if ! apt_install "$@" 2>/dev/null; then
    echo "install: apt-get update"
    wait_for_lock
    as_root apt-get update -qq -o "DPkg::Lock::Timeout=$wait_s"
    wait_for_lock
    apt_install "$@"
fi
