#!/usr/bin/env bash
# Installs what the instruction-count gate (scripts/instructions.sh) needs, only what is missing:
# valgrind and jq from Debian's packages, and `gungraun-runner`, the binary that runs the benches of
# the `gungraun` library under callgrind. The runner must have exactly the library's version, read here
# from Cargo.lock (the one home of that version): a runner of another version refuses to run.
# Idempotent: when all are present at the right version it says so and does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

# valgrind runs the benches; jq reads their JSON summaries (scripts/instructions.sh).
bash scripts/install-deb.sh valgrind valgrind
bash scripts/install-deb.sh jq jq

# The version of the `gungraun` package locked for the benches: the line after its name.
want=$(awk '/^name = "gungraun"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
[[ -n "$want" ]] || { echo "install-gungraun: no gungraun package in Cargo.lock" >&2; exit 1; }
have=$(gungraun-runner --version 2>/dev/null | awk '{print $NF}' || true)
if [[ "$have" == "$want" ]]; then
    echo "install-gungraun: gungraun-runner $have already installed; nothing to do"
    exit 0
fi
echo "install-gungraun: gungraun-runner ${have:-not found}, the benches need $want; installing it"
start=$(date +%s)
cargo install gungraun-runner --version "=$want" --locked
echo "install-gungraun: installed gungraun-runner $(gungraun-runner --version | awk '{print $NF}') in $(( $(date +%s) - start )) s"
