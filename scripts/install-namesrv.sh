#!/usr/bin/env bash
# Installs the RocketMQ name server used by tests/interop_namesrv.rs, only when it is missing.
#   rocketmq-namesrv 1.0.0 (crates.io) provides the binary `rocketmq-namesrv-rust`; it needs the
#   nightly toolchain and takes about 10 minutes to build on a 2-core machine.
# Idempotent: if the binary is already installed (KEYED_POOL_NAMESRV_BIN, PATH, $CARGO_HOME/bin),
# it says so and does nothing.
set -euo pipefail

BIN=rocketmq-namesrv-rust
CRATE=rocketmq-namesrv
VERSION=1.0.0
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"

if [[ -n "${KEYED_POOL_NAMESRV_BIN:-}" && -x "${KEYED_POOL_NAMESRV_BIN}" ]]; then
    echo "install-namesrv: using KEYED_POOL_NAMESRV_BIN=${KEYED_POOL_NAMESRV_BIN}; nothing to do"
    exit 0
fi
if found="$(command -v "$BIN" 2>/dev/null)"; then
    echo "install-namesrv: $BIN already installed at $found; nothing to do"
    exit 0
fi
if [[ -x "$CARGO_BIN/$BIN" ]]; then
    echo "install-namesrv: $BIN already installed at $CARGO_BIN/$BIN (not on PATH; the test finds it there); nothing to do"
    exit 0
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "install-namesrv: the nightly toolchain is required: rustup toolchain install nightly" >&2
    exit 1
fi
echo "install-namesrv: $BIN not found; installing $CRATE $VERSION with cargo +nightly (about 10 min)"
start=$(date +%s)
cargo +nightly install "$CRATE" --version "$VERSION" --locked
echo "install-namesrv: installed $CARGO_BIN/$BIN in $(( $(date +%s) - start )) s"
