#!/usr/bin/env bash
# Usage: install-deb.sh COMMAND PACKAGE
# Installs PACKAGE from Debian's packages when COMMAND is not found (on PATH or in /usr/sbin, where
# Debian puts daemons). Idempotent: if COMMAND is there it says so and does nothing.
# The tests start and stop their own servers on loopback: no system service is started here (the
# package's own service is not started during the install; where systemd runs, it is disabled).
# Used by install-redis.sh and install-nginx.sh.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 COMMAND PACKAGE" >&2
    exit 2
fi
cmd=$1
package=$2
find_cmd() { PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" 2>/dev/null; }

if found="$(find_cmd)"; then
    echo "install-deb: $cmd already installed at $found; nothing to do"
    exit 0
fi

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO=(sudo)
fi
echo "install-deb: $cmd not found; installing $package from Debian's packages"
start=$(date +%s)
"${SUDO[@]}" apt-get update
# policy-rc.d exit code 101 tells invoke-rc.d not to start the package's service during install.
policy=/usr/sbin/policy-rc.d
added_policy=false
if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
    "${SUDO[@]}" chmod +x "$policy"
    added_policy=true
fi
status=0
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y --no-install-recommends "$package" || status=$?
if [[ "$added_policy" == true ]]; then
    "${SUDO[@]}" rm -f "$policy"
fi
[[ "$status" -eq 0 ]] || { echo "install-deb: apt-get install $package failed ($status)" >&2; exit "$status"; }
# Where systemd runs, keep the unit from starting at boot: the tests start their own servers.
if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
    "${SUDO[@]}" systemctl disable --now "$cmd" >/dev/null 2>&1 || true
fi
found="$(find_cmd)" || { echo "install-deb: $package installed but $cmd is still missing" >&2; exit 1; }
echo "install-deb: installed $found (from $package) in $(( $(date +%s) - start )) s; no service started"
