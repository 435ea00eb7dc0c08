#!/usr/bin/env bash
# Installs only the RocketMQ name server (`rocketmq-namesrv-rust`, rocketmq-namesrv 1.0.0) used by
# remoting/tests/interop_namesrv.rs, when it is missing: about 5 minutes on a 2-core machine
# (unoptimised; 10 minutes optimised, KEYED_POOL_ROCKETMQ_PROFILE=release), with the nightly
# toolchain. scripts/install-rocketmq.sh installs it together with the broker.
set -euo pipefail
exec bash "$(dirname "$0")/install-rocketmq.sh" namesrv
