#!/usr/bin/env bash
# Installs `redis-server` from Debian's packages for interop/tests/redis.rs, only when it is
# missing. Idempotent: if `redis-server` is already on PATH it says so and does nothing.
# The test starts and stops its own servers on loopback: no system service is started here (the
# package's own service is not started either when there is no init system, as in a container;
# where there is one, it is stopped and disabled again if this script was what installed it).
set -euo pipefail

if found="$(command -v redis-server 2>/dev/null)"; then
    echo "install-redis: redis-server already installed at $found ($("$found" --version | head -n 1)); nothing to do"
    exit 0
fi

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO=(sudo)
fi
echo "install-redis: redis-server not found; installing it from Debian's packages"
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
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y --no-install-recommends redis-server || status=$?
if [[ "$added_policy" == true ]]; then
    "${SUDO[@]}" rm -f "$policy"
fi
[[ "$status" -eq 0 ]] || { echo "install-redis: apt-get install failed ($status)" >&2; exit "$status"; }
# Where systemd runs, keep the unit from starting at boot: the tests start their own servers.
if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
    "${SUDO[@]}" systemctl disable --now redis-server >/dev/null 2>&1 || true
fi
echo "install-redis: installed $(command -v redis-server) ($(redis-server --version | head -n 1)) in $(( $(date +%s) - start )) s; no service started"
