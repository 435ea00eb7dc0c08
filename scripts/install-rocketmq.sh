#!/usr/bin/env bash
# Installs the RocketMQ servers the interop tests run against, only those missing:
#   rocketmq-namesrv 1.0.0 -> `rocketmq-namesrv-rust` (remoting/tests/interop_namesrv.rs and
#                             remoting/tests/interop_broker.rs)
#   rocketmq-broker 1.0.0  -> `rocketmq-broker-rust`  (remoting/tests/interop_broker.rs)
# Both need the nightly toolchain. They share most of their dependencies, so they are built by one
# `cargo install` into one target directory.
#
# Built unoptimised by default (`--debug`, no debug info): about 470 s of CPU for both, against
# 1,600 s for a release build (measured on 2 cores; remoting/README.md has the figures), and the
# tests need no speed from the servers. KEYED_POOL_ROCKETMQ_PROFILE=release builds them optimised.
#
# Usage: bash scripts/install-rocketmq.sh [namesrv] [broker]   (default: both)
# Idempotent: a binary already installed (KEYED_POOL_NAMESRV_BIN / KEYED_POOL_BROKER_BIN, PATH,
# the install root's bin: $CARGO_INSTALL_ROOT, else $CARGO_HOME, else ~/.cargo) is left alone. The
# shared target directory is $KEYED_POOL_ROCKETMQ_TARGET_DIR if set (and kept), else a temporary
# one (removed afterwards).
set -euo pipefail

VERSION=1.0.0
BIN_DIR="${CARGO_INSTALL_ROOT:-${CARGO_HOME:-$HOME/.cargo}}/bin"
PROFILE="${KEYED_POOL_ROCKETMQ_PROFILE:-debug}"

# component -> crate, binary, environment variable naming an installed binary
declare -A CRATE=([namesrv]=rocketmq-namesrv [broker]=rocketmq-broker)
declare -A BIN=([namesrv]=rocketmq-namesrv-rust [broker]=rocketmq-broker-rust)
declare -A VAR=([namesrv]=KEYED_POOL_NAMESRV_BIN [broker]=KEYED_POOL_BROKER_BIN)

components=("$@")
[[ ${#components[@]} -gt 0 ]] || components=(namesrv broker)

# Prints where the component's binary is installed; fails if it is not.
installed() {
    local var="${VAR[$1]}" bin="${BIN[$1]}"
    if [[ -n "${!var:-}" && -x "${!var}" ]]; then
        echo "${!var} ($var)"
    elif command -v "$bin" >/dev/null 2>&1; then
        command -v "$bin"
    elif [[ -x "$BIN_DIR/$bin" ]]; then
        echo "$BIN_DIR/$bin"
    else
        return 1
    fi
}

case "$PROFILE" in
    debug) profile_args=(--debug) ;;
    release) profile_args=() ;;
    *) echo "install-rocketmq: KEYED_POOL_ROCKETMQ_PROFILE must be debug or release" >&2; exit 2 ;;
esac

missing=()
for c in "${components[@]}"; do
    if [[ -z "${CRATE[$c]:-}" ]]; then
        echo "install-rocketmq: unknown component '$c' (namesrv, broker)" >&2
        exit 2
    fi
    if where="$(installed "$c")"; then
        echo "install-rocketmq: ${BIN[$c]} already installed at $where; nothing to do for it"
    else
        missing+=("$c")
    fi
done
[[ ${#missing[@]} -gt 0 ]] || exit 0

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "install-rocketmq: the nightly toolchain is required: rustup toolchain install nightly" >&2
    exit 1
fi
crates=()
for c in "${missing[@]}"; do crates+=("${CRATE[$c]}@$VERSION"); done

if [[ -n "${KEYED_POOL_ROCKETMQ_TARGET_DIR:-}" ]]; then
    target="$KEYED_POOL_ROCKETMQ_TARGET_DIR"
else
    target="$(mktemp -d "${TMPDIR:-/tmp}/keyed-pool-rocketmq-target.XXXXXX")"
    trap 'rm -rf "$target"' EXIT
fi
echo "install-rocketmq: installing ${crates[*]} ($PROFILE build) with cargo +nightly; one target dir: $target"
start=$(date +%s)
# No debug info in the debug build: it would make the build slower and the binaries much larger.
CARGO_TARGET_DIR="$target" CARGO_PROFILE_DEV_DEBUG=0 \
    cargo +nightly install "${crates[@]}" --locked "${profile_args[@]}"
for c in "${missing[@]}"; do
    if [[ ! -x "$BIN_DIR/${BIN[$c]}" ]]; then
        echo "install-rocketmq: $BIN_DIR/${BIN[$c]} not found after the install" >&2
        exit 1
    fi
    # `cargo install` keeps the build's mtime, which can predate the last run of remoting/build.rs
    # (a target dir built earlier); cargo would then not re-run it and keep the tests ignored.
    touch "$BIN_DIR/${BIN[$c]}"
done
echo "install-rocketmq: installed ${crates[*]} into $BIN_DIR in $(( $(date +%s) - start )) s"
if [[ -n "${CARGO_INSTALL_ROOT:-}" ]]; then
    echo "install-rocketmq: the tests look on PATH and in \$CARGO_HOME/bin: add $BIN_DIR to PATH"
fi
