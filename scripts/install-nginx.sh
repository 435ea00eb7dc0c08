#!/usr/bin/env bash
# Installs `nginx` from Debian's packages (nginx-light: the core server, no extra modules) for
# interop/tests/nginx.rs, only when it is missing (see install-deb.sh: idempotent, starts no
# service; the test runs its own nginx on loopback with a config of its own).
set -euo pipefail
exec bash "$(dirname "$0")/install-deb.sh" nginx nginx-light
