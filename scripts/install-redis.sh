#!/usr/bin/env bash
# Installs `redis-server` from Debian's packages for interop/tests/redis.rs, only when it is
# missing (see install-deb.sh: idempotent, starts no service).
set -euo pipefail
exec bash "$(dirname "$0")/install-deb.sh" redis-server redis-server
