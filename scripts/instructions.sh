#!/usr/bin/env bash
# The instruction-count gate (issue 16): runs benches/benches/instructions.rs under callgrind
# (gungraun), compares each benchmark's instruction count with its record in
# benches/instructions.toml, prints a table, and exits 1 when any count is more than 5 % above its
# record (or a benchmark and the records do not list the same names). Counts below their record
# pass; the table says when re-recording would keep the gain.
#
#   bash scripts/instructions.sh            # the gate
#   bash scripts/instructions.sh --record   # rewrite benches/instructions.toml from this run
#
# Counts depend on the compiler and its flags, not on the machine's load, so the gate holds on a
# shared machine; a new toolchain (or a dependency update) can move them: re-record then, in its
# own commit. Installs valgrind, jq and gungraun-runner when missing (scripts/install-gungraun.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

BENCH=benches/benches/instructions.rs
RECORD=benches/instructions.toml
MAX_GROWTH_PCT=5 # fail above this
REGAIN_PCT=2     # below the record by more than this (over the ~1 % noise): suggest re-recording

record=false
case "${1:-}" in
  "") ;;
  --record) record=true ;;
  *) echo "usage: $0 [--record]" >&2; exit 2 ;;
esac

bash scripts/install-gungraun.sh

# Operations per benchmark, from the bench (its one home), for the per-operation column.
ops=$(sed -n 's/^const OPS: usize = \([0-9_]*\);.*/\1/p' "$BENCH" | tr -d _)
[[ -n "$ops" ]] || { echo "instructions.sh: no 'const OPS: usize = N;' line in $BENCH" >&2; exit 1; }

json=$(mktemp)
now=$(mktemp)
trap 'rm -f "$json" "$now"' EXIT
start=$SECONDS
# One JSON summary per line on stdout; cargo's and gungraun's logs stay on stderr.
cargo bench -p keyed-pool-benches --bench instructions -- --output-format=json >"$json"
# "function/id<TAB>instructions", in the bench's order.
jq -r '[.function_name + "/" + .id, .profiles[0].data.total.metrics.Ir.values.new] | @tsv' \
  "$json" >"$now"
[[ -s "$now" ]] || { echo "instructions.sh: the bench reported no benchmark" >&2; exit 1; }
echo "instructions.sh: $(wc -l <"$now") benchmarks counted in $((SECONDS - start)) s (build included)"

if [[ "$record" == true ]]; then
  {
    echo "# Instruction counts of $BENCH (callgrind, $ops operations per"
    echo "# benchmark), the records of the CI gate: scripts/instructions.sh fails when a count grows"
    echo "# more than ${MAX_GROWTH_PCT} % above its record here. Written by \`bash scripts/instructions.sh --record\`."
    echo "# Recorded $(date -u +%Y-%m-%d) at $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src benches || echo ' (with changes)')"
    echo "# with $(rustc --version), $(valgrind --version), on $(uname -m)."
    echo
    echo "[counts]"
    awk -F'\t' '{ printf "\"%s\" = %s\n", $1, $2 }' "$now"
  } >"$RECORD"
  echo "instructions.sh: wrote $RECORD"
fi

[[ -f "$RECORD" ]] || { echo "instructions.sh: no $RECORD: run 'bash scripts/instructions.sh --record'" >&2; exit 1; }

# The table, and the verdict as the exit status.
awk -F'\t' -v ops="$ops" -v max="$MAX_GROWTH_PCT" -v regain="$REGAIN_PCT" -v record="$RECORD" '
  FNR == NR {
    if ($0 ~ /^"[^"]+" = [0-9]+$/) {
      split($0, kv, "\" = "); name = substr(kv[1], 2); rec[name] = kv[2] + 0
    }
    next
  }
  {
    n++; names[n] = $1; now[$1] = $2 + 0
    split($1, parts, "/"); if (parts[1] == "floor_get") floor[parts[2]] = $2 + 0
  }
  END {
    printf "%-28s %12s %12s %9s %9s %9s  %s\n", "benchmark", "recorded", "now", "change", "per op", "/ floor", ""
    bad = 0
    for (i = 1; i <= n; i++) {
      name = names[i]; split(name, parts, "/")
      ratio = (parts[2] in floor) ? sprintf("%.2fx", now[name] / floor[parts[2]]) : "-"
      if (!(name in rec)) {
        printf "%-28s %12s %12d %9s %9.1f %9s  FAIL: no record\n", name, "-", now[name], "-", now[name] / ops, ratio
        bad = 1; continue
      }
      change = (now[name] - rec[name]) * 100 / rec[name]
      verdict = "ok"
      if (change > max) { verdict = sprintf("FAIL: more than %d %% above the record", max); bad = 1 }
      else if (change < -regain) verdict = "lower: re-record to keep the gain"
      printf "%-28s %12d %12d %+8.2f%% %9.1f %9s  %s\n", name, rec[name], now[name], change, now[name] / ops, ratio, verdict
      seen[name] = 1
    }
    for (name in rec) if (!(name in seen)) {
      printf "%-28s %12d %12s %9s %9s %9s  FAIL: recorded, but no longer benchmarked\n", name, rec[name], "-", "-", "-", "-"
      bad = 1
    }
    printf "(per op: instructions / %d operations, loop included; / floor: this count over floor_get at the same address count)\n", ops
    if (bad) {
      printf "instructions.sh: FAILED: a count grew more than %d %% over %s, or the names differ. If the growth is intended, re-record: bash scripts/instructions.sh --record\n", max, record
      exit 1
    }
    printf "instructions.sh: every count within %d %% of its record in %s\n", max, record
  }
' "$RECORD" "$now"
