#!/usr/bin/env bash
# The test suite: every test file of `cargo test`, several at a time.
#
# `cargo test` runs one test binary after another; most of walshuttle's tests wait on
# PostgreSQL servers of their own rather than on the CPU, so running two binaries
# side by side (each with two test threads) saves a good part of the time on a
# 2-core machine. Each binary's output goes to a log, printed when it fails.
#
#   scripts/test.sh                 # everything (fetches the other PostgreSQL versions once)
#   WALSHUTTLE_TEST_JOBS=1 scripts/test.sh   # one binary at a time, as `cargo test` does
set -euo pipefail
cd "$(dirname "$0")/.."

jobs="${WALSHUTTLE_TEST_JOBS:-2}"
logs="$(mktemp -d -t walshuttle-tests-XXXXXX)"

# Binaries of the other major versions tests/versions.rs replicates between.
scripts/fetch-postgres.sh 14 16 17 18

# Build every test binary first (one build, all cores).
cargo test --no-run 2>"$logs/build.log" || { cat "$logs/build.log"; exit 1; }
mapfile -t binaries < <(sed -n 's/^ *Executable .*(\(.*\))$/\1/p' "$logs/build.log")
if [ "${#binaries[@]}" -eq 0 ]; then
  echo "no test binaries found in the build output:" >&2
  cat "$logs/build.log" >&2
  exit 1
fi

# The longest first, so the tail of the run is short ones.
slow="run_stream network_faults chaos schema_drift switchover capture_ddl failover versions tables_live"
ordered=()
for s in $slow; do
  for b in "${binaries[@]}"; do
    case "$(basename "$b")" in "$s"-*) ordered+=("$b") ;; esac
  done
done
for b in "${binaries[@]}"; do
  case " ${ordered[*]} " in *" $b "*) ;; *) ordered+=("$b") ;; esac
done

run_one() {
  local bin="$1" logs="$2"
  local name
  name="$(basename "$bin")"
  local started=$SECONDS
  if "$bin" --test-threads=2 >"$logs/$name.log" 2>&1; then
    echo "ok     $name ($((SECONDS - started)) s): $(grep -E '^test result' "$logs/$name.log" | tail -1)"
  else
    echo "FAILED $name ($((SECONDS - started)) s)"
    touch "$logs/$name.failed"
  fi
}
export -f run_one

started=$SECONDS
printf '%s\n' "${ordered[@]}" | xargs -P "$jobs" -I{} bash -c 'run_one "$@"' _ {} "$logs"
# Examples in doc comments.
if ! cargo test --doc >"$logs/doc.log" 2>&1; then
  touch "$logs/doc.failed"
  echo "FAILED doc tests"
fi

failed=0
for f in "$logs"/*.failed; do
  [ -e "$f" ] || continue
  failed=1
  name="$(basename "$f" .failed)"
  echo
  echo "===== $name ====="
  cat "$logs/$name.log"
done
echo
if [ "$failed" -ne 0 ]; then
  echo "test suite FAILED after $((SECONDS - started)) s (logs in $logs)"
  exit 1
fi
echo "test suite passed in $((SECONDS - started)) s"
