#!/usr/bin/env bash
# Mutation testing with cargo-mutants (issue 17): how much of the code can change without a test
# failing. Installs cargo-mutants 27.1.0 when missing. One mode per run:
#
#   bash scripts/mutants.sh core    # src/core/*.rs (not loom_tests.rs) against the tests that see the core
#   bash scripts/mutants.sh pool    # the pool layer against the library's unit and integration tests
#   bash scripts/mutants.sh diff    # only mutants in lines changed since $BASE (default HEAD~1)
#
# Each mode is bounded: a per-mutant timeout (MUTANTS_TIMEOUT, seconds, default 60; the build has
# MUTANTS_BUILD_TIMEOUT, default 300) and a whole-run limit (MUTANTS_MAX_SECONDS; default 3600 for
# core and pool, 600 for diff). A run cut by the whole-run limit still prints the score of the
# mutants it finished, and says it was cut. Output: target/mutants/<mode>/mutants.out/ (caught.txt,
# missed.txt, timeout.txt, unviable.txt, outcomes.json, log/).
#
# The score per area (file) is (caught + timeout) / (caught + timeout + missed): a mutant that makes
# the tests hang is detected; unviable mutants (they do not compile) are left out. The survivors
# (missed) are listed. Extra arguments go to cargo-mutants (for example `--re 'health.rs'` to test
# a subset, or `-j 2`). Set MUTANTS_JOBS to change the parallelism (default 1: the machine is shared).
# Exit status: 0 when the run finished (survivors or not), 1 on a usage or tool error, 2 when the
# whole-run limit cut the run; `MUTANTS_FAIL_ON_MISSED=1` makes a surviving mutant exit 3 (CI's diff step).
set -euo pipefail
# The whole script is one function, read before it runs: editing this file during a run (which takes
# up to an hour) cannot change what the running shell executes next.
main() {
cd "$(dirname "$0")/.."

mode="${1:-}"
shift || true
case "$mode" in
  core | pool | diff) ;;
  *)
    echo "usage: $0 core|pool|diff [cargo-mutants args...]" >&2
    exit 1
    ;;
esac

if ! cargo mutants --version 2>/dev/null | grep -q '^cargo-mutants 27\.'; then
  cargo install cargo-mutants --locked --version 27.1.0
fi

out="target/mutants/$mode"
mkdir -p "$out"
rm -rf "$out/mutants.out" "$out/mutants.out.old"
timeout_s="${MUTANTS_TIMEOUT:-60}"
build_timeout_s="${MUTANTS_BUILD_TIMEOUT:-300}"
jobs="${MUTANTS_JOBS:-1}"

# The test targets that can catch a mutant of the core: the core's unit tests (--lib) and the
# integration tests whose subject is a core rule (the capacity ledger, the health verdict and window,
# the idle rule, the ejection order, the call record behind the metrics and pool.call). The other
# integration tests (connect, liveness, lifecycle, warmup, tcp) exercise the core only through these
# same paths and cost more per mutant. Measured on 2 shared cores: ~6 s of tests per mutant.
CORE_TESTS=(--lib --test=capacity --test=health --test=idle --test=ejection --test=metrics --test=calls)
# The pool layer is checked by every unit and integration test of the library.
POOL_TESTS=(--lib --tests)

args=(--package keyed-pool --test-package keyed-pool -j "$jobs" --timeout "$timeout_s"
  --build-timeout "$build_timeout_s" --output "$out" --no-shuffle)
# Debug info only slows the link of each mutant's test binaries; the tests do not need it.
export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-0}"
case "$mode" in
  core)
    max_s="${MUTANTS_MAX_SECONDS:-3600}"
    args+=(--file 'src/core/*.rs' --exclude 'src/core/loom_tests.rs')
    tests=("${CORE_TESTS[@]}")
    ;;
  pool)
    max_s="${MUTANTS_MAX_SECONDS:-3600}"
    # MUTANTS_FILES picks some of the files (the run over all of them takes hours on 2 cores).
    for f in ${MUTANTS_FILES:-src/pool.rs src/sweep.rs src/connect.rs src/connection.rs src/cleanup.rs \
      src/call.rs src/probe.rs src/warmup.rs src/slot.rs}; do
      args+=(--file "$f")
    done
    tests=("${POOL_TESTS[@]}")
    ;;
  diff)
    max_s="${MUTANTS_MAX_SECONDS:-600}"
    base="${BASE:-HEAD~1}"
    if ! git rev-parse --verify -q "$base^{commit}" >/dev/null; then
      echo "mutants: no commit $base here (a shallow clone, or the first commit); nothing to compare"
      exit 0
    fi
    git diff "$base" -- src >"$out/diff.patch"
    if [[ ! -s "$out/diff.patch" ]]; then
      echo "mutants: no change under src/ since $base; nothing to test"
      exit 0
    fi
    args+=(--in-diff "$out/diff.patch" --exclude 'src/core/loom_tests.rs')
    tests=("${POOL_TESTS[@]}")
    ;;
esac

echo "mutants: mode $mode, whole-run limit ${max_s}s, per-mutant timeout ${timeout_s}s, $jobs job(s)"
# The targets go in as --cargo-arg, so that cargo-mutants's build of each mutant (`cargo test
# --no-run`) builds only them, not every test, example and bench of the package.
for t in "${tests[@]}"; do args+=("--cargo-arg=$t"); done
echo "+ cargo mutants ${args[*]} $*"
set +e
timeout --signal=INT --kill-after=30 "$max_s" \
  nice -n 10 cargo mutants "${args[@]}" "$@"
rc=$?
set -e
# cargo-mutants: 0 all caught, 2 some missed, 3 some timed out, 4 the unmutated tree fails its tests.
cut=0
case "$rc" in
  0 | 2 | 3) ;;
  124 | 130 | 137) cut=1 ;;
  *)
    echo "mutants: cargo-mutants failed (exit $rc); see $out/mutants.out/log/" >&2
    exit 1
    ;;
esac

dir="$out/mutants.out"
mkdir -p "$dir" # cargo-mutants makes no output when no mutant is in scope
for f in caught missed timeout unviable; do touch "$dir/$f.txt"; done
echo
echo "== score per area ($mode): caught+timeout / (caught+timeout+missed), unviable left out"
printf "%-24s %7s %7s %7s %9s %7s\n" area caught timeout missed unviable score
awk -F: '
  FNR == 1 { kind = FILENAME; sub(/.*\//, "", kind); sub(/\.txt$/, "", kind) }
  NF > 0 { n[$1, kind]++; files[$1] = 1; tot[kind]++ }
  END {
    for (f in files) {
      c = n[f, "caught"] + 0; t = n[f, "timeout"] + 0; m = n[f, "missed"] + 0; u = n[f, "unviable"] + 0
      s = (c + t + m) ? sprintf("%.1f%%", 100 * (c + t) / (c + t + m)) : "-"
      printf "%-24s %7d %7d %7d %9d %7s\n", f, c, t, m, u, s
    }
    c = tot["caught"] + 0; t = tot["timeout"] + 0; m = tot["missed"] + 0; u = tot["unviable"] + 0
    s = (c + t + m) ? sprintf("%.1f%%", 100 * (c + t) / (c + t + m)) : "-"
    printf "%-24s %7d %7d %7d %9d %7s\n", "TOTAL", c, t, m, u, s
  }' "$dir/caught.txt" "$dir/timeout.txt" "$dir/missed.txt" "$dir/unviable.txt" | sort -k1,1 | awk '$1 != "TOTAL" { print } $1 == "TOTAL" { last = $0 } END { print last }'
echo
echo "== survivors (missed)"
if [[ -s "$dir/missed.txt" ]]; then sort "$dir/missed.txt"; else echo "(none)"; fi
if [[ "$cut" == 1 ]]; then
  echo "mutants: the whole-run limit (${max_s}s) cut the run; the score covers the mutants it finished" >&2
  exit 2
fi
if [[ "${MUTANTS_FAIL_ON_MISSED:-0}" == 1 && -s "$dir/missed.txt" ]]; then
  exit 3
fi
}
main "$@"
