#!/usr/bin/env bash
# Installs only the RocketMQ name server (`rocketmq-namesrv-rust`, rocketmq-namesrv 1.0.0) used by
# remoting/tests/interop_namesrv.rs, when it is missing: about 10 minutes on a 2-core machine, with
# the nightly toolchain. scripts/install-rocketmq.sh installs it together with the broker.
set -euo pipefail
exec bash "$(dirname "$0")/install-rocketmq.sh" namesrv
