#!/usr/bin/env bash
# Catch-up cost against a full recopy: after a bootstrap of a large table, the slot is
# dropped (as an operator would), a few rows change, and `walshuttle catch-up` repairs
# the gap; the alternative, a fresh bootstrap of the changed table into an empty
# database, is timed the same way. Two throwaway local PostgreSQL clusters.
# See bench/README.md ("catchup.sh") for what is measured and how.
#
#   bench/catchup.sh [--rows N] [--jobs J] [--wait-load L] [--out NAME] ...
#
# Results: bench/results/NAME.json, NAME.md (NAME defaults to `catchup`) and
# bench/results/logs/NAME/. Exits non-zero only when something broke (a command
# failed, verify found a difference, a wait timed out), never because of a figure.

set -euo pipefail

# One block, parsed before it runs: editing the file during a run cannot change it.
{

# ---------------------------------------------------------------- options ----
ROWS=5000000
JOBS=2
FAST=0
BASE_PORT=56200
BUILD=0
KEEP=0
OUT=catchup
WAIT_LOAD=""
WAIT_MAX=1200
N_ADVANCE=500
N_SILENT=250
N_INSERT=150
N_DELETE=100

usage() {
    cat <<'EOF'
usage: bench/catchup.sh [options]

  --rows N          rows of the source table `items` (default 5000000, ~100 bytes each)
  --jobs J          --jobs for walshuttle bootstrap, catch-up and verify (default 2)
  --fast            run both clusters with fsync=off (default: fsync on)
  --port P          first port to try for the two clusters (default 56200)
  --build           run `cargo build --release` first
  --keep            keep the temporary directory (clusters, logs) on exit
  --out NAME        results as bench/results/NAME.{json,md}, logs in
                    bench/results/logs/NAME/ (default catchup)
  --wait-load L     before each timed step, wait until the 1-minute load average is
                    below L (polled every 30 s; default: do not wait)
  --wait-max S      give up waiting after S seconds and measure anyway, with a note
                    (default 1200)
  -h, --help        this text

The changes between the slot's loss and the catch-up are fixed: 500 updates that
advance updated_at, 250 updates that do not (found only by the row comparison),
150 inserts, 100 deletes, each set on distinct random rows (seeded, so every run
changes the same rows).

Environment: WALSHUTTLE_BIN (default target/release/walshuttle), WALSHUTTLE_BIN_REV
(what the binary was built from, e.g. a commit, recorded in the results), PGBIN (default
/usr/lib/postgresql/15/bin, else `pg_config --bindir`).
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --rows) ROWS=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --fast) FAST=1; shift ;;
        --port) BASE_PORT=$2; shift 2 ;;
        --build) BUILD=1; shift ;;
        --keep) KEEP=1; shift ;;
        --out) OUT=$2; shift 2 ;;
        --wait-load) WAIT_LOAD=$2; shift 2 ;;
        --wait-max) WAIT_MAX=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "catchup.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for v in ROWS JOBS BASE_PORT WAIT_MAX; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || [ "${!v}" -lt 1 ]; then
        echo "catchup.sh: ${v,,} must be a positive integer" >&2; exit 2
    fi
done
if [ "$ROWS" -lt 10000 ]; then echo "catchup.sh: --rows must be at least 10000" >&2; exit 2; fi
if [ -n "$WAIT_LOAD" ] && ! [[ $WAIT_LOAD =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "catchup.sh: --wait-load must be a number (e.g. 0.8)" >&2; exit 2
fi
if ! [[ $OUT =~ ^[A-Za-z0-9._-]+$ ]]; then echo "catchup.sh: --out must be a plain file name" >&2; exit 2; fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS="$REPO/bench/results"
LOGDIR="$RESULTS/logs/$OUT"
if [ -z "${PGBIN:-}" ]; then
    if [ -x /usr/lib/postgresql/15/bin/postgres ]; then PGBIN=/usr/lib/postgresql/15/bin
    else PGBIN=$(pg_config --bindir); fi
fi
PSQL="$PGBIN/psql"

log() { printf '%s  %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
loadavg() { cut -d' ' -f1 /proc/loadavg; }

LOAD_START=$(loadavg)

# ---------------------------------------------------------------- binary -----
if [ "$BUILD" = 1 ]; then
    log "building walshuttle (cargo build --release)"
    (cd "$REPO" && cargo build --release) >&2
fi
WS_SRC_BIN=${WALSHUTTLE_BIN:-$REPO/target/release/walshuttle}
[ -x "$WS_SRC_BIN" ] || die "no walshuttle binary at $WS_SRC_BIN: run cargo build --release (or pass --build)"
for tool in initdb pg_ctl postgres psql; do
    [ -x "$PGBIN/$tool" ] || die "$PGBIN/$tool not found (set PGBIN)"
done

# --------------------------------------------------------------- workspace ---
WORK=$(mktemp -d /tmp/walshuttle-catchup.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/logs" "$WORK/sock"
METRICS="$WORK/metrics.tsv"      # key <TAB> value
NOTES="$WORK/notes.txt"
FAILED="$WORK/failed"
PIDS="$WORK/pids"
: >"$METRICS"; : >"$NOTES"; : >"$PIDS"
WS="$WORK/walshuttle"            # a snapshot: a rebuild during the run cannot swap it
cp "$WS_SRC_BIN" "$WS"
WS_BUILT=$(date -u -r "$WS_SRC_BIN" +%Y-%m-%dT%H:%M:%SZ)
WS_SHA=$(sha256sum "$WS" | cut -c1-16)

IS_ROOT=0; [ "$(id -u)" = 0 ] && IS_ROOT=1
as_pg() { if [ "$IS_ROOT" = 1 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$IS_ROOT" = 1 ]; then chown postgres "$WORK/sock"; fi

track() { echo "$1" >>"$PIDS"; }
record() { printf '%s\t%s\n' "$1" "$2" >>"$METRICS"; }
val() { awk -F'\t' -v k="$1" '$1 == k { v = $2 } END { if (v != "") print v }' "$METRICS"; }
note() { log "NOTE: $*"; printf '%s\n' "$*" >>"$NOTES"; }
broke() { note "FAILURE: $*"; touch "$FAILED"; }

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -s "$PIDS" ]; then
        while read -r pid; do
            [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null
        done <"$PIDS"
        sleep 0.5
        while read -r pid; do
            [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        done <"$PIDS"
    fi
    for d in "$WORK/source" "$WORK/target"; do
        [ -f "$d/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1
    done
    if [ -d "$WORK/logs" ]; then
        mkdir -p "$LOGDIR"
        rm -f "$LOGDIR"/*.log "$LOGDIR"/*.txt
        cp "$WORK"/logs/*.log "$LOGDIR/" 2>/dev/null
        for d in source target; do
            [ -f "$WORK/$d.log" ] && tail -n 400 "$WORK/$d.log" >"$LOGDIR/postgres-$d.log"
        done
    fi
    if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- clusters ---
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
next_port() {
    local p=$1
    while ! port_free "$p"; do p=$((p + 1)); done
    echo "$p"
}

PASSWORD=bench
export PGPASSWORD=$PASSWORD
printf '%s\n' "$PASSWORD" >"$WORK/pwfile"
chmod 644 "$WORK/pwfile"

# the same settings as compare.sh, identical on both clusters
start_cluster() {   # name port
    local name=$1 port=$2 dir="$WORK/$1"
    mkdir -p "$dir"
    [ "$IS_ROOT" = 1 ] && chown postgres "$dir"
    chmod 700 "$dir"
    as_pg "$PGBIN/initdb" -D "$dir" -U postgres --pwfile="$WORK/pwfile" \
        --auth-host=scram-sha-256 --auth-local=trust -E UTF8 --locale=C >"$WORK/logs/initdb-$name.log" 2>&1 \
        || die "initdb of $name failed: $(tail -n 5 "$WORK/logs/initdb-$name.log")"
    cat >>"$dir/postgresql.conf" <<EOF

# ---- walshuttle bench/catchup.sh: identical on source and target ----
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$WORK/sock'
wal_level = logical
max_wal_senders = 20
max_replication_slots = 20
shared_buffers = 512MB
max_wal_size = 4GB
checkpoint_timeout = 30min
fsync = $([ "$FAST" = 1 ] && echo off || echo on)
max_worker_processes = 8
# statements of 100 ms or more are logged with their duration: the per-step breakdown
# of server time in the results (where each step's time went)
log_min_duration_statement = 100
EOF
    : >"$WORK/$name.log"
    [ "$IS_ROOT" = 1 ] && chown postgres "$WORK/$name.log"
    as_pg "$PGBIN/pg_ctl" -D "$dir" -l "$WORK/$name.log" -w -t 60 start >/dev/null \
        || die "starting $name failed: $(tail -n 5 "$WORK/$name.log")"
}

q() { local port=$1 db=$2; shift 2; "$PSQL" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$db" "$@"; }
qs() { q "$SP" bench -c "$1"; }
qt() { q "$TP" bench -c "$1"; }
qs_admin() { q "$SP" postgres -c "$1"; }
qt_admin() { q "$TP" postgres -c "$1"; }
checkpoint_both() { qs_admin "CHECKPOINT" >/dev/null; qt_admin "CHECKPOINT" >/dev/null; }

SP=$(next_port "$BASE_PORT")
TP=$(next_port $((SP + 1)))
SRC_URL="postgresql://postgres:$PASSWORD@127.0.0.1:$SP/bench"
TGT_URL="postgresql://postgres:$PASSWORD@127.0.0.1:$TP/bench"

log "workspace $WORK; source on port $SP, target on port $TP; fsync $([ "$FAST" = 1 ] && echo off || echo on)"
start_cluster source "$SP"
start_cluster target "$TP"
PG_VERSION=$(qs_admin "SHOW server_version")
qs_admin "CREATE DATABASE bench" >/dev/null
qt_admin "CREATE DATABASE bench" >/dev/null

# ------------------------------------------------------------------- data ----
# ids 1..ROWS; created_at spread evenly over the year before the load (ending an hour
# before it), updated_at up to an hour later: the watermark window of the catch-up
# (the target's max(updated_at) minus 5 minutes) then holds the rows changed on
# purpose plus the few dozen stamped in the last minutes, as in a live table.
log "loading $ROWS rows into items"
t0=$(now)
q "$SP" bench >"$WORK/logs/load.log" 2>&1 <<EOF || die "loading the source failed: $(tail -n 5 "$WORK/logs/load.log")"
CREATE TABLE public.items (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    qty int NOT NULL,
    payload text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
INSERT INTO public.items
SELECT g, 'item-' || g, (g * 7919) % 1000, md5(g::text),
       c, c + ((g * 104729) % 3600) * interval '1 second'
FROM (SELECT now() - interval '1 hour' AS t) n,
     generate_series(1::bigint, $ROWS) AS g,
     LATERAL (SELECT n.t - interval '365 days' + (g::float8 / $ROWS) * interval '365 days' AS c) x;
CREATE INDEX items_updated_at ON public.items (updated_at);
VACUUM (FREEZE, ANALYZE) public.items;
EOF
t1=$(now)
SRC_ROWS=$(qs "SELECT count(*) FROM items")
[ "$SRC_ROWS" = "$ROWS" ] || die "the source has $SRC_ROWS rows, expected $ROWS"
HEAP_BYTES=$(qs "SELECT pg_relation_size('items')")
TOTAL_PRETTY=$(qs "SELECT pg_size_pretty(pg_total_relation_size('items'))")
# the tuple (header included) on average, and the heap per row (line pointers, pages)
ROW_BYTES=$(qs "SELECT round(avg(pg_column_size(i.*)))::int FROM (SELECT * FROM items LIMIT 100000) i")
HEAP_ROW_BYTES=$((HEAP_BYTES / ROWS))
record load_s "$(elapsed "$t0" "$t1")"
log "source: $ROWS rows of ~$ROW_BYTES bytes, heap $(qs "SELECT pg_size_pretty($HEAP_BYTES::bigint)") ($HEAP_ROW_BYTES bytes a row), $TOTAL_PRETTY with indexes; loaded in $(elapsed "$t0" "$t1") s"

# ---------------------------------------------------------------- helpers ----
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true; }
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# watchdog PID SECONDS HWMFILE: samples VmHWM every 50 ms; kills PID past SECONDS
watchdog() {
    local pid=$1 limit=$2 file=$3 start v
    start=$(date +%s)
    while kill -0 "$pid" 2>/dev/null; do
        v=$(hwm_kib "$pid"); [ -n "$v" ] && echo "$v" >"$file"
        if [ $(( $(date +%s) - start )) -ge "$limit" ]; then
            echo timeout >"$file.timeout"
            kill -TERM "$pid" 2>/dev/null; sleep 10; kill -KILL "$pid" 2>/dev/null
            break
        fi
        sleep 0.05
    done
}

# wait_quiet STEP: with --wait-load, wait (polling every 30 s, at most --wait-max s)
# until the 1-minute load average is below the limit; records how long it waited
wait_quiet() {
    local step=$1 start l
    [ -n "$WAIT_LOAD" ] || return 0
    start=$(date +%s)
    while :; do
        l=$(loadavg)
        if awk -v l="$l" -v m="$WAIT_LOAD" 'BEGIN { exit !(l < m) }'; then break; fi
        if [ $(( $(date +%s) - start )) -ge "$WAIT_MAX" ]; then
            note "$step: the 1-minute load average stayed at or above $WAIT_LOAD for $WAIT_MAX s (now $l); measured anyway"
            break
        fi
        log "$step: load average $l, waiting for it to drop below $WAIT_LOAD"
        sleep 30
    done
    record "${step}_waited_s" $(( $(date +%s) - start ))
}

# timed STEP LOGNAME CMD...: runs a walshuttle command with the clock and the load
# average around it and its peak RSS sampled; sets RC; records STEP_s
timed() {
    local step=$1 name=$2 t0 t1 pid wd
    shift 2
    wait_quiet "$step"
    checkpoint_both
    record "${step}_load_start" "$(loadavg)"
    RC=0
    local so to
    so=$(stat -c %s "$WORK/source.log"); to=$(stat -c %s "$WORK/target.log")
    t0=$(now)
    record "${step}_started_utc" "$(date -u -d "@$t0" +%Y-%m-%dT%H:%M:%S.%6NZ)"
    "$@" >"$WORK/logs/$name.log" 2>&1 &
    pid=$!; track "$pid"
    watchdog "$pid" 3600 "$WORK/hwm-$step" & wd=$!; track "$wd"
    wait "$pid" || RC=$?
    t1=$(now)
    record "${step}_load_end" "$(loadavg)"
    server_time "$step" source "$so"
    server_time "$step" target "$to"
    wait "$wd" 2>/dev/null || true
    [ -f "$WORK/hwm-$step" ] && record "${step}_peak_rss_mib" "$(kib_to_mib "$(cat "$WORK/hwm-$step")")"
    if [ -f "$WORK/hwm-$step.timeout" ]; then
        broke "$step did not finish within 3600 s (killed): $(tail -n 3 "$WORK/logs/$name.log" | tr '\n' ' ')"
        RC=124
    fi
    record "${step}_s" "$(elapsed "$t0" "$t1")"
    record "${step}_exit" "$RC"
    log "$step: $(elapsed "$t0" "$t1") s, exit $RC (load $(val "${step}_load_start") -> $(val "${step}_load_end"))"
}

# server_time STEP SIDE OFFSET: sums the durations the SIDE server logged since byte
# OFFSET of its log, by kind of statement; appends "step side kind count seconds" to
# server-time.tsv and records STEP_server_SIDE_KIND_s
server_time() {
    local step=$1 side=$2 off=$3
    tail -c +"$((off + 1))" "$WORK/$side.log" | awk -v step="$step" -v side="$side" '
        /duration: [0-9.]+ ms/ {
            match($0, /duration: [0-9.]+ ms/); d = substr($0, RSTART + 10, RLENGTH - 13) / 1000
            k = "other"
            if ($0 ~ /COPY .*TO STDOUT/) k = "copy_out"
            else if ($0 ~ /COPY .*FROM STDIN/) k = "copy_in"
            else if ($0 ~ /CREATE (UNIQUE )?INDEX|ADD CONSTRAINT|PRIMARY KEY/) k = "index_build"
            else if ($0 ~ /count\(\*\), coalesce\(sum\(hashtextextended/) k = "range_digest"
            else if ($0 ~ /SELECT hashtextextended\(/) k = "row_hashes"
            else if ($0 ~ /(INSERT|DELETE|UPDATE|MERGE) /) k = "writes"
            else if ($0 ~ /min\(|max\(|count\(\*\)/) k = "spans_and_counts"
            n[k]++; t[k] += d
        }
        END { for (k in n) printf "%s\t%s\t%s\t%d\t%.3f\n", step, side, k, n[k], t[k] }' |
        sort -k3 >>"$WORK/server-time.tsv"
    awk -F'\t' -v s="$step" -v d="$side" '$1 == s && $2 == d { print $3 "\t" $5 }' "$WORK/server-time.tsv" |
        while IFS=$'\t' read -r k v; do record "${step}_server_${side}_${k}_s" "$v"; done
}

counts_equal() {   # step
    local s t
    s=$(qs "SELECT count(*) FROM items"); t=$(qt "SELECT count(*) FROM items" 2>/dev/null || echo missing)
    if [ "$s" != "$t" ]; then broke "$1: target has $t rows in items, the source $s"; return 1; fi
}

drop_source_replication() {
    qs_admin "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = 'bench' AND active_pid IS NOT NULL" >/dev/null
    qs_admin "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = 'bench'" >/dev/null
    qs "DO \$\$ DECLARE p text; BEGIN FOR p IN SELECT pubname FROM pg_publication LOOP EXECUTE format('DROP PUBLICATION %I', p); END LOOP; END \$\$" >/dev/null
}

# =========================================================== measurements ====
measure() {
    # 1. the full copy the pipeline starts with
    log "bootstrap --jobs $JOBS of $ROWS rows"
    timed bootstrap walshuttle-bootstrap "$WS" --source "$SRC_URL" --target "$TGT_URL" bootstrap --jobs "$JOBS"
    [ "$RC" = 0 ] || { broke "bootstrap exited $RC: $(tail -n 5 "$WORK/logs/walshuttle-bootstrap.log" | tr '\n' ' ')"; return 1; }
    counts_equal bootstrap

    # 2. the operator drops the slot: its WAL is gone, only catch-up can repair
    qs_admin "SELECT pg_drop_replication_slot('walshuttle')" >/dev/null
    log "slot dropped; changing $((N_ADVANCE + N_SILENT + N_INSERT + N_DELETE)) rows on the source"

    # 3. the changes: distinct random rows (seeded), each kind in its own transaction
    "$PSQL" -X -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$SP" -U postgres -d bench >"$WORK/logs/changes.log" 2>&1 <<EOF || { broke "changing the source failed: $(tail -n 5 "$WORK/logs/changes.log")"; return 1; }
SELECT setseed(0.42);
CREATE TEMP TABLE pick AS
SELECT id, row_number() OVER (ORDER BY md5(id::text)) AS n
FROM (SELECT DISTINCT (1 + floor(random() * $ROWS))::bigint AS id
      FROM generate_series(1, $(( (N_ADVANCE + N_SILENT + N_DELETE) * 3 )))) s;
SELECT 'picked', count(*) FROM pick;
UPDATE items SET qty = qty + 1, updated_at = clock_timestamp()
 WHERE id IN (SELECT id FROM pick WHERE n <= $N_ADVANCE);
UPDATE items SET payload = md5(coalesce(payload, '') || 'x')
 WHERE id IN (SELECT id FROM pick WHERE n > $N_ADVANCE AND n <= $((N_ADVANCE + N_SILENT)));
INSERT INTO items
SELECT $ROWS + g, 'item-' || ($ROWS + g), g % 1000, md5(g::text || 'new'), clock_timestamp(), clock_timestamp()
FROM generate_series(1, $N_INSERT) AS g;
DELETE FROM items
 WHERE id IN (SELECT id FROM pick WHERE n > $((N_ADVANCE + N_SILENT)) AND n <= $((N_ADVANCE + N_SILENT + N_DELETE)));
EOF
    # psql prints each statement's tag: every kind must have touched exactly its rows
    local expect got
    expect=$(printf 'UPDATE %s\nUPDATE %s\nINSERT 0 %s\nDELETE %s' "$N_ADVANCE" "$N_SILENT" "$N_INSERT" "$N_DELETE")
    got=$(grep -E '^(UPDATE|INSERT|DELETE) ' "$WORK/logs/changes.log" || true)
    [ "$got" = "$expect" ] || { broke "the changes did not touch the expected rows: $(echo "$got" | tr '\n' ' ')"; return 1; }
    got=$(qs "SELECT count(*) FROM items")
    record rows_after_changes "$got"

    # 4. catch-up
    log "catch-up --jobs $JOBS"
    timed catchup walshuttle-catchup "$WS" --source "$SRC_URL" --target "$TGT_URL" catch-up --jobs "$JOBS"
    [ "$RC" = 0 ] || { broke "catch-up exited $RC: $(tail -n 5 "$WORK/logs/walshuttle-catchup.log" | tr '\n' ' ')"; return 1; }
    local summary
    summary=$(grep -m1 'catch-up finished' "$WORK/logs/walshuttle-catchup.log" || true)
    [ -n "$summary" ] || broke "catch-up printed no summary line"
    record catchup_summary "$summary"
    if [[ $summary =~ ([0-9]+)\ tables,\ ([0-9]+)\ rows\ upserted,\ ([0-9]+)\ rows\ deleted\ \(([0-9]+)\ found\ only ]]; then
        record catchup_rows_upserted "${BASH_REMATCH[2]}"
        record catchup_rows_deleted "${BASH_REMATCH[3]}"
        record catchup_found_only_by_comparison "${BASH_REMATCH[4]}"
    fi

    # 5. the result must be right: verify exits 0 only when every row is equal
    log "verify --jobs $JOBS"
    timed verify walshuttle-verify "$WS" --source "$SRC_URL" --target "$TGT_URL" verify --jobs "$JOBS"
    [ "$RC" = 0 ] || broke "verify after catch-up exited $RC (1: different, 2: error): $(tail -n 5 "$WORK/logs/walshuttle-verify.log" | tr '\n' ' ')"

    # 6. the alternative: a fresh bootstrap of the changed table into an empty database
    drop_source_replication
    qt_admin "DROP DATABASE bench WITH (FORCE)" >/dev/null
    qt_admin "CREATE DATABASE bench" >/dev/null
    log "recopy: bootstrap --jobs $JOBS into an empty target database"
    timed recopy walshuttle-recopy "$WS" --source "$SRC_URL" --target "$TGT_URL" bootstrap --jobs "$JOBS"
    [ "$RC" = 0 ] || { broke "recopy bootstrap exited $RC: $(tail -n 5 "$WORK/logs/walshuttle-recopy.log" | tr '\n' ' ')"; return 1; }
    counts_equal recopy

    # 7. untimed diagnostics: what one pass of whole-row hashing costs on the source
    # (the comparison in catch-up hashes every row on both sides)
    local h0 h1
    h0=$(now)
    qs "SELECT count(*), sum(hashtextextended(i::text, 0)) FROM items i" >/dev/null
    h1=$(now)
    record diag_source_full_hash_s "$(elapsed "$h0" "$h1")"
}

T_ALL0=$(now)
set +e
( set -e; measure )
MRC=$?
set -e
[ "$MRC" = 0 ] || [ -f "$FAILED" ] || broke "the measurement stopped early (exit $MRC)"
T_ALL1=$(now)

# ---- where catch-up's time went: its log lines, as seconds since it started ----
CU_LOG="$WORK/logs/walshuttle-catchup.log"
CU_START=$(val catchup_started_utc)
if [ -f "$CU_LOG" ] && [ -n "$CU_START" ]; then
    cu0=$(date -d "$CU_START" +%s.%N)
    prev=$cu0
    while read -r ts rest; do
        t=$(date -d "$ts" +%s.%N 2>/dev/null) || continue
        printf '+%8.3f s (step %7.3f s)  %s\n' "$(elapsed "$cu0" "$t")" "$(elapsed "$prev" "$t")" "$(printf '%s' "$rest" | cut -c1-200)"
        case $rest in
            *"created a new slot for catch-up"*) record catchup_until_slot_s "$(elapsed "$cu0" "$t")" ;;
            *"rewrote rows changed since the watermark"*) record catchup_window_done_s "$(elapsed "$cu0" "$t")" ;;
            *"row comparison found rows"*) record catchup_comparison_done_s "$(elapsed "$cu0" "$t")" ;;
        esac
        prev=$t
    done < <(grep -E '^[0-9]{4}-[0-9]{2}-[0-9]{2}T' "$CU_LOG" || true) >"$WORK/catchup-phases.txt"
fi

# ================================================================ report =====
mkdir -p "$RESULTS"
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
NPROC=$(nproc)
RAM_GIB=$(awk '/^MemTotal:/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
WS_VERSION=$("$WS" --version 2>/dev/null | awk '{ print $2 }')
GIT_REV=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
ratio() { [ -n "$1" ] && [ -n "$2" ] && awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print ""; else printf "%.2f", a / b }'; }
fmt() { [ -n "$1" ] && echo "$1" || echo "—"; }
B=$(val bootstrap_s); C=$(val catchup_s); R=$(val recopy_s)
record ratio_catchup_to_bootstrap "$(ratio "$C" "$B")"
record ratio_catchup_to_recopy "$(ratio "$C" "$R")"

MD="$RESULTS/$OUT.md"
{
    echo "# walshuttle catch-up vs full recopy — $DATE"
    echo
    echo "- machine: $NPROC CPUs ($CPU_MODEL), $RAM_GIB GiB RAM"
    echo "- PostgreSQL $PG_VERSION (source and target clusters on this machine, fsync $([ "$FAST" = 1 ] && echo off || echo on))"
    echo "- walshuttle $WS_VERSION: binary sha256 $WS_SHA… built $WS_BUILT${WALSHUTTLE_BIN_REV:+ from $WALSHUTTLE_BIN_REV}; repository HEAD $GIT_REV"
    echo "- data: \`items\`, $ROWS rows (tuples of ~$ROW_BYTES bytes; heap $HEAP_BYTES bytes, $HEAP_ROW_BYTES a row; $TOTAL_PRETTY with the key and the updated_at index); --jobs $JOBS"
    echo "- changes while the slot was gone: $N_ADVANCE updates advancing updated_at, $N_SILENT updates not advancing it, $N_INSERT inserts, $N_DELETE deletes"
    echo "- 1-minute load average before the run: $LOAD_START$([ -n "$WAIT_LOAD" ] && echo "; each timed step waited for it to drop below $WAIT_LOAD (at most $WAIT_MAX s)")"
    echo
    echo "| step | s | load avg at start | at end | peak RSS MiB | exit |"
    echo "|---|---:|---:|---:|---:|---:|"
    for s in bootstrap catchup verify recopy; do
        case $s in
            bootstrap) label="bootstrap (full copy, keys + indexes)" ;;
            catchup) label="catch-up after the slot was dropped" ;;
            verify) label="verify after catch-up (untimed in the ratio)" ;;
            recopy) label="recopy: fresh bootstrap into an empty database" ;;
        esac
        echo "| $label | $(fmt "$(val "${s}_s")") | $(fmt "$(val "${s}_load_start")") | $(fmt "$(val "${s}_load_end")") | $(fmt "$(val "${s}_peak_rss_mib")") | $(fmt "$(val "${s}_exit")") |"
    done
    echo
    echo "- catch-up / bootstrap: **$(fmt "$(val ratio_catchup_to_bootstrap)")**; catch-up / recopy: **$(fmt "$(val ratio_catchup_to_recopy)")** (below 1: catch-up is cheaper)"
    echo "- catch-up summary: \`$(fmt "$(val catchup_summary)")\`"
    echo "- one whole-row hash pass over the source table (diagnostic): $(fmt "$(val diag_source_full_hash_s)") s; data load $(val load_s) s"
    if [ -s "$WORK/server-time.tsv" ]; then
        echo
        echo "Server time by kind of statement during each step (statements of 100 ms or more,"
        echo "from each server's log; statements of several sessions overlap, so a sum can exceed"
        echo "the step's time): copy_out/copy_in = COPY, index_build = keys and indexes,"
        echo "range_digest = count and hash of a key range, row_hashes = every row's hash of a"
        echo "range sent to walshuttle, spans_and_counts = min/max/count scans."
        echo
        echo "| step | server | kind | statements | s |"
        echo "|---|---|---|---:|---:|"
        awk -F'\t' '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }' "$WORK/server-time.tsv"
    fi
    if [ -s "$WORK/catchup-phases.txt" ]; then
        echo
        echo "catch-up log, as seconds since the process started ($(val catchup_started_utc)); it exited at +$(val catchup_s) s:"
        echo
        echo '```'
        cat "$WORK/catchup-phases.txt"
        echo '```'
    fi
    if [ -s "$NOTES" ]; then
        echo
        echo "Notes:"
        echo
        sed 's/^/- /' "$NOTES"
    fi
} >"$MD"

JSON="$RESULTS/$OUT.json"
json_str() { printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' | tr -d '\000-\037')"; }
json_val() { if [ -z "$1" ]; then echo null; elif [[ $1 =~ ^-?[0-9]+(\.[0-9]+)?$ ]]; then echo "$1"; else json_str "$1"; fi; }
{
    echo "{"
    echo "  \"date\": $(json_str "$DATE"),"
    echo "  \"machine\": {\"nproc\": $NPROC, \"ram_gib\": $RAM_GIB, \"cpu\": $(json_str "$CPU_MODEL")},"
    echo "  \"postgresql\": $(json_str "$PG_VERSION"),"
    echo "  \"walshuttle\": {\"version\": $(json_str "$WS_VERSION"), \"binary_sha256_prefix\": $(json_str "$WS_SHA"), \"binary_built\": $(json_str "$WS_BUILT"), \"binary_rev\": $(json_str "${WALSHUTTLE_BIN_REV:-}"), \"repo_head\": $(json_str "$GIT_REV")},"
    echo "  \"params\": {\"rows\": $ROWS, \"jobs\": $JOBS, \"fsync\": $([ "$FAST" = 1 ] && echo false || echo true), \"row_bytes\": $(json_val "$ROW_BYTES"), \"heap_bytes_per_row\": $HEAP_ROW_BYTES, \"heap_bytes\": $(json_val "$HEAP_BYTES"), \"changes\": {\"updates_advancing_updated_at\": $N_ADVANCE, \"updates_not_advancing\": $N_SILENT, \"inserts\": $N_INSERT, \"deletes\": $N_DELETE}, \"load_avg_1m_before\": $LOAD_START, \"wait_load\": $(json_val "$WAIT_LOAD"), \"wait_max_s\": $WAIT_MAX},"
    echo "  \"figures\": {"
    awk -F'\t' '{ v[$1] = $2; if (!($1 in seen)) { seen[$1] = 1; order[++n] = $1 } }
        END { for (i = 1; i <= n; i++) { k = order[i]; x = v[k];
                  if (x !~ /^-?[0-9]+(\.[0-9]+)?$/) { gsub(/\\/, "\\\\", x); gsub(/"/, "\\\"", x); x = "\"" x "\"" }
                  printf "    \"%s\": %s%s\n", k, x, (i < n ? "," : "") } }' "$METRICS"
    echo "  },"
    echo "  \"notes\": ["
    awk 'NR > 1 { printf ",\n" } { gsub(/\\/, "\\\\"); gsub(/"/, "\\\""); gsub(/\t/, " "); printf "    \"%s\"", $0 } END { printf "\n" }' "$NOTES"
    echo "  ],"
    echo "  \"failed\": $([ -f "$FAILED" ] && echo true || echo false)"
    echo "}"
} >"$JSON"
if command -v jq >/dev/null 2>&1; then jq empty "$JSON" || log "warning: $JSON is not valid JSON"; fi

echo
cat "$MD"
echo
echo "results: $JSON, $MD, $LOGDIR/"
log "done in $(elapsed "$T_ALL0" "$T_ALL1") s"
if [ -f "$FAILED" ]; then
    log "something broke (see notes above); exiting 1"
    exit 1
fi
exit 0
}
