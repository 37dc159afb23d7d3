#!/usr/bin/env bash
# Installs what WireTAP Server needs to run, idempotently: Python's venv module (Debian package
# python3-venv) and can-utils when missing (scripts/apt-install.sh: it waits for another apt, such as
# unattended-upgrades on a Pi that has just booted), then .venv with requirements.txt, and notes
# the git commit in wiretap/BUILD_COMMIT for --version when the code is later run without .git.
#   scripts/install.sh            runtime only
#   scripts/install.sh --dev      also the test tools (requirements-dev.txt, Chromium for the
#                                 status page's browser test)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv python3-pip)
command -v candump >/dev/null || packages+=(can-utils)
if [ "${1:-}" = "--dev" ]; then
    command -v chromium >/dev/null || packages+=(chromium)
fi
if [ ${#packages[@]} -gt 0 ]; then
    scripts/apt-install.sh "${packages[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
requirements=requirements.txt
[ "${1:-}" = "--dev" ] && requirements=requirements-dev.txt
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements"

if commit=$(git rev-parse --short=12 HEAD 2>/dev/null); then
    echo "$commit" > wiretap/BUILD_COMMIT
fi
