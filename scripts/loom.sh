#!/usr/bin/env bash
# The loom tier: model-checks the lock-free core (src/core/loom_tests.rs) under `--cfg loom`, where
# `crate::sync`'s atomics and mutex are loom's. Every interleaving of each test's 2–3 threads is
# explored, up to LOOM_MAX_PREEMPTIONS preemptions per execution (default 3: about 10 s in release
# mode on 2 cores; 4 takes about a minute). Fails if no loom test ran.
#
# The cfg goes through --config build.rustflags (as the madsim step of .ci/run does), so a RUSTFLAGS
# variable would silently replace it: refuse one. The separate target dir keeps the loom build from
# invalidating the normal one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${RUSTFLAGS:-}" ]]; then
  echo "loom.sh: RUSTFLAGS is set ('$RUSTFLAGS'); unset it: it would override --cfg loom" >&2
  exit 1
fi
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-3}"
LOOM=(--config "build.rustflags=['--cfg','loom']" --config "build.target-dir='target/loom'")
cmd=(cargo test --release -p keyed-pool --lib "${LOOM[@]}" loom_tests -- --nocapture)
echo "loom.sh: LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS ${cmd[*]}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$SECONDS
"${cmd[@]}" 2>&1 | tee "$log"
# Guard: the build really had cfg(loom) (the loom tests exist only then) and they ran.
grep -q "core::loom_tests::loom_claim_vs_retire ... ok" "$log" \
  || { echo "loom.sh: the loom tests did not run (was the crate built with --cfg loom?)" >&2; exit 1; }
ran=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
[[ "$ran" -ge 1 ]] || { echo "loom.sh: zero loom tests ran" >&2; exit 1; }
echo "loom.sh: $ran loom tests passed, LOOM_MAX_PREEMPTIONS=$LOOM_MAX_PREEMPTIONS, $((SECONDS - start)) s"
