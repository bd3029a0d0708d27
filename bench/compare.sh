#!/usr/bin/env bash
# walshuttle vs its peers (pgcopydb, native logical replication, a psql \copy pipe),
# side by side, in one run, on two throwaway local PostgreSQL clusters.
# See bench/README.md for what is measured and how.
#
#   bench/compare.sh [--scale N] [--jobs J] [--fast] [--port P] [--build] [--keep]
#                    [--only copy] [--out NAME] [--wait-load L]
#                    [--tpcb] [--pg17] [--many-tables] [--profile] [--no-floor]
#
# Results: bench/results/latest.json, bench/results/latest.md, bench/results/logs/
# (with --out NAME: NAME.json, NAME.md, logs/NAME/).
# Exits non-zero only when something broke (a tool failed, a wait timed out),
# never because of a ratio.

set -euo pipefail

# The whole script is one block, parsed before it runs: editing the file while a run
# is in progress cannot change the run.
{

# ---------------------------------------------------------------- options ----
SCALE=20
JOBS=2
FAST=0
BASE_PORT=56100
BUILD=0
KEEP=0
BULK_ROWS=1000000
BACKLOG_TXNS=60000
STEADY_RATE=500
STEADY_SECONDS=30
SPLIT_THRESHOLD=50MB
NATIVE_STREAMING=off
ONLY=all
OUT=latest
WAIT_LOAD=""
WAIT_MAX=1200
FLOOR=1
TPCB=0
TPCB_SECONDS=60
TPCB_CLIENTS=8
TPCB_SCALE=10
TPCB_BACKLOG_TXNS=40000
PG17=0
PG17_HOME=${PG17_HOME:-/var/cache/walshuttle/postgres/17}
MANY=0
MANY_COUNT=2000
MANY_ROWS=100
MIXED_COUNT=50
MIXED_MAX=200000
MANY_TIMEOUT=1800
PROFILE=0

usage() {
    cat <<'EOF'
usage: bench/compare.sh [options]

  --scale N             demo data scale: 100,000*N recommendation rows (default 20)
  --jobs J              parallel jobs for walshuttle bootstrap and pgcopydb (default 2)
  --fast                run both clusters with fsync=off (default: fsync on)
  --port P              first port to try for the two clusters (default 56100)
  --build               run `cargo build --release` first
  --keep                keep the temporary directory (clusters, logs) on exit
  --bulk-rows N         rows of the single bulk-apply transaction (default 1000000)
  --backlog-txns N      single-row UPDATE transactions of the backlog (default 60000)
  --steady-rate R       pgbench -R for the steady-state load (default 500)
  --steady-seconds T    pgbench -T for the steady-state load (default 30)
  --split-threshold S   pgcopydb --split-tables-larger-than (default 50MB)
  --native-streaming on|off
                        the native subscription's `streaming` option (default off,
                        PostgreSQL's default)
  --only copy           measure only the initial copy of each tool (no bulk apply,
                        backlog, latency or steady state)
  --only tpcb           measure only the TPC-B parts (implies --tpcb)
  --out NAME            write bench/results/NAME.json and NAME.md, logs to
                        bench/results/logs/NAME/ (default latest: latest.json,
                        latest.md, logs/)
  --wait-load L         before each timed initial copy, wait until the 1-minute load
                        average is below L (polled every 30 s; default: do not wait)
  --wait-max S          give up waiting after S seconds and measure anyway, with a
                        note (default 1200)
  --no-floor            skip the floor (the target alone loading COPY TO files with
                        one COPY FROM per worker, then keys and indexes; default: on)
  --tpcb                TPC-B at full speed: pgbench -b tpcb-like (own database,
                        pgbench -i -s --tpcb-scale) for --tpcb-seconds with
                        --tpcb-clients clients while walshuttle / native stream it; lag
                        sampled every 0.2 s, drain after pgbench ends, tps
  --tpcb-seconds T      pgbench -T of the TPC-B load (default 60)
  --tpcb-clients C      pgbench -c of the TPC-B load (default 8)
  --tpcb-scale S        pgbench -i -s of the TPC-B database (default 10)
  --tpcb-backlog-txns N with --tpcb: then TPC-B transactions written by --tpcb-clients
                        clients while the replicator is stopped, and the time to
                        drain them (default 40000; 0 skips)
  --pg17                a second pair of clusters from PostgreSQL 17 (PG17_HOME, default
                        /var/cache/walshuttle/postgres/17): walshuttle and native with
                        WITH (binary = true, streaming = parallel) measured there too
                        (everything but the copy-only tools; TPC-B with --tpcb)
  --many-tables         bootstrap of --many-count tables of --many-rows rows and of
                        --mixed-count tables of 10..--mixed-max rows: walshuttle,
                        pgcopydb and native; walshuttle run's start-up time on each
  --many-count N        tables of the many-tables schema (default 2000)
  --many-rows N         rows in each of them (default 100)
  --mixed-count N       tables of the mixed schema (default 50)
  --mixed-max N         rows of its largest table (default 200000; the smallest has 10)
  --many-timeout S      give up on one tool's many-tables bootstrap after S s (default 1800)
  --profile             with --tpcb: walshuttle's TPC-B run uses a binary built with
                        --features profiling (WALSHUTTLE_PROFILE_BIN, or built into
                        target-prof/) and writes bench/results/tpcb-flamegraph.svg
  -h, --help            this text

Environment: WALSHUTTLE_BIN (default target/release/walshuttle), WALSHUTTLE_BIN_REV
(what the binary was built from, e.g. a commit, recorded in the results), WALSHUTTLE_RUN_ARGS
(extra flags for `walshuttle run`, e.g. "--status-interval 0.2"), PGBIN (default
/usr/lib/postgresql/15/bin, else `pg_config --bindir`), PG17_HOME (--pg17's server
binaries: PG17_HOME/bin/{initdb,pg_ctl,postgres}; clients stay PGBIN's),
WALSHUTTLE_PROFILE_BIN (--profile: a binary built with --features profiling; default:
cargo build --release --features profiling into target-prof/).
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --scale) SCALE=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --fast) FAST=1; shift ;;
        --port) BASE_PORT=$2; shift 2 ;;
        --build) BUILD=1; shift ;;
        --keep) KEEP=1; shift ;;
        --bulk-rows) BULK_ROWS=$2; shift 2 ;;
        --backlog-txns) BACKLOG_TXNS=$2; shift 2 ;;
        --steady-rate) STEADY_RATE=$2; shift 2 ;;
        --steady-seconds) STEADY_SECONDS=$2; shift 2 ;;
        --split-threshold) SPLIT_THRESHOLD=$2; shift 2 ;;
        --native-streaming) NATIVE_STREAMING=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --wait-load) WAIT_LOAD=$2; shift 2 ;;
        --wait-max) WAIT_MAX=$2; shift 2 ;;
        --no-floor) FLOOR=0; shift ;;
        --tpcb) TPCB=1; shift ;;
        --tpcb-seconds) TPCB_SECONDS=$2; shift 2 ;;
        --tpcb-clients) TPCB_CLIENTS=$2; shift 2 ;;
        --tpcb-scale) TPCB_SCALE=$2; shift 2 ;;
        --tpcb-backlog-txns) TPCB_BACKLOG_TXNS=$2; shift 2 ;;
        --pg17) PG17=1; shift ;;
        --many-tables) MANY=1; shift ;;
        --many-count) MANY_COUNT=$2; shift 2 ;;
        --many-rows) MANY_ROWS=$2; shift 2 ;;
        --mixed-count) MIXED_COUNT=$2; shift 2 ;;
        --mixed-max) MIXED_MAX=$2; shift 2 ;;
        --many-timeout) MANY_TIMEOUT=$2; shift 2 ;;
        --profile) PROFILE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for v in SCALE JOBS BASE_PORT BULK_ROWS BACKLOG_TXNS STEADY_RATE STEADY_SECONDS WAIT_MAX \
         TPCB_SECONDS TPCB_CLIENTS TPCB_SCALE TPCB_BACKLOG_TXNS MANY_COUNT MANY_ROWS MIXED_COUNT MIXED_MAX MANY_TIMEOUT; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || [ "${!v}" -lt 1 ]; then
        echo "compare.sh: ${v,,} must be a positive integer" >&2; exit 2
    fi
done
case "$NATIVE_STREAMING" in on|off) ;; *) echo "compare.sh: --native-streaming on|off" >&2; exit 2 ;; esac
case "$ONLY" in all|copy) ;; tpcb) TPCB=1 ;; *) echo "compare.sh: --only copy or --only tpcb (or all, the default)" >&2; exit 2 ;; esac
if ! [[ $OUT =~ ^[A-Za-z0-9._-]+$ ]]; then echo "compare.sh: --out must be a plain file name" >&2; exit 2; fi
if [ "$PROFILE" = 1 ] && [ "$TPCB" = 0 ]; then echo "compare.sh: --profile profiles the TPC-B run: give --tpcb too" >&2; exit 2; fi
if [ "$MIXED_COUNT" -lt 2 ] || [ "$MIXED_MAX" -lt 10 ]; then echo "compare.sh: --mixed-count must be at least 2 and --mixed-max at least 10" >&2; exit 2; fi
if [ "$ONLY" = copy ] && { [ "$TPCB" = 1 ] || [ "$MANY" = 1 ]; }; then
    echo "compare.sh: --only copy measures the initial copy only: drop --tpcb / --many-tables" >&2; exit 2
fi
if [ -n "$WAIT_LOAD" ] && ! [[ $WAIT_LOAD =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "compare.sh: --wait-load must be a number (e.g. 0.8)" >&2; exit 2
fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$REPO/bench"
RESULTS="$BENCH/results"
# latest keeps its logs where they always were
if [ "$OUT" = latest ]; then LOGDIR="$RESULTS/logs"; else LOGDIR="$RESULTS/logs/$OUT"; fi
if [ -z "${PGBIN:-}" ]; then
    if [ -x /usr/lib/postgresql/15/bin/postgres ]; then PGBIN=/usr/lib/postgresql/15/bin
    else PGBIN=$(pg_config --bindir); fi
fi
export PATH="$PGBIN:$PATH"          # pgcopydb runs pg_dump/pg_restore from PATH
PSQL="$PGBIN/psql"
ROWS=$((SCALE * 100000))

log() { printf '%s  %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
now() { date +%s.%N; }
# seconds between two `now` stamps, 3 decimals
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

# the 1-minute load average before anything of ours runs: other work on the machine
# (builds, test suites) skews every figure
LOAD_START=$(cut -d' ' -f1 /proc/loadavg)

# ---------------------------------------------------------------- binary -----
if [ "$BUILD" = 1 ]; then
    log "building walshuttle (cargo build --release)"
    (cd "$REPO" && cargo build --release) >&2
fi
WS_SRC_BIN=${WALSHUTTLE_BIN:-$REPO/target/release/walshuttle}
[ -x "$WS_SRC_BIN" ] || die "no walshuttle binary at $WS_SRC_BIN: run cargo build --release (or pass --build)"
for tool in initdb pg_ctl postgres pgbench psql pg_dump; do
    [ -x "$PGBIN/$tool" ] || die "$PGBIN/$tool not found (set PGBIN)"
done
WS_PROF_SRC_BIN=""
if [ "$PROFILE" = 1 ]; then
    if [ -n "${WALSHUTTLE_PROFILE_BIN:-}" ]; then
        WS_PROF_SRC_BIN=$WALSHUTTLE_PROFILE_BIN
    else
        log "building the profiling binary (cargo build --release --features profiling, target dir target-prof)"
        (cd "$REPO" && CARGO_TARGET_DIR="$REPO/target-prof" cargo build --release --features profiling) >&2 \
            || die "cargo build --release --features profiling failed"
        WS_PROF_SRC_BIN=$REPO/target-prof/release/walshuttle
    fi
    [ -x "$WS_PROF_SRC_BIN" ] || die "no profiling binary at $WS_PROF_SRC_BIN"
fi
if [ "$PG17" = 1 ]; then
    for tool in initdb pg_ctl postgres; do
        [ -x "$PG17_HOME/bin/$tool" ] || die "$PG17_HOME/bin/$tool not found: run scripts/fetch-postgres.sh (or set PG17_HOME)"
    done
fi

# --------------------------------------------------------------- workspace ---
WORK=$(mktemp -d /tmp/walshuttle-bench.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/logs" "$WORK/sock"
METRICS="$WORK/metrics.tsv"      # key <TAB> tool <TAB> value
NOTES="$WORK/notes.txt"          # free text, one note a line
FAILED="$WORK/failed"            # exists when something broke
PIDS="$WORK/pids"                # background processes to end on exit
: >"$METRICS"; : >"$NOTES"; : >"$PIDS"
# snapshot of the binary: a rebuild during the run must not swap it under us
WS="$WORK/walshuttle"
cp "$WS_SRC_BIN" "$WS"
WS_BUILT=$(date -u -r "$WS_SRC_BIN" +%Y-%m-%dT%H:%M:%SZ)
WS_SHA=$(sha256sum "$WS" | cut -c1-16)
WS_PROF=""; WS_PROF_SHA=""
if [ -n "$WS_PROF_SRC_BIN" ]; then
    WS_PROF="$WORK/walshuttle-profiling"
    cp "$WS_PROF_SRC_BIN" "$WS_PROF"
    WS_PROF_SHA=$(sha256sum "$WS_PROF" | cut -c1-16)
fi

IS_ROOT=0; [ "$(id -u)" = 0 ] && IS_ROOT=1
as_pg() { if [ "$IS_ROOT" = 1 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$IS_ROOT" = 1 ]; then chown postgres "$WORK/sock"; fi

track() { echo "$1" >>"$PIDS"; }
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$METRICS"; }
note() { log "NOTE: $*"; printf '%s\n' "$*" >>"$NOTES"; }
broke() { note "FAILURE: $*"; touch "$FAILED"; }

SP=""; TP=""
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
    # every cluster started, each stopped with its own major's pg_ctl
    if [ -f "$WORK/clusters" ]; then
        while read -r d bin; do
            [ -f "$d/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1
        done <"$WORK/clusters"
    fi
    if [ -d "$WORK/logs" ]; then
        mkdir -p "$LOGDIR"
        rm -f "$LOGDIR"/*.log "$LOGDIR"/*.txt
        cp "$WORK"/logs/*.log "$WORK"/logs/*.txt "$LOGDIR/" 2>/dev/null
        for d in source target source17 target17; do
            [ -f "$WORK/$d.log" ] && tail -n 400 "$WORK/$d.log" >"$LOGDIR/postgres-$d.log"
        done
    fi
    if [ "$KEEP" = 1 ]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
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

start_cluster() {   # name port [server bindir]
    local name=$1 port=$2 dir="$WORK/$1" bin=${3:-$PGBIN}
    mkdir -p "$dir"
    [ "$IS_ROOT" = 1 ] && chown postgres "$dir"
    chmod 700 "$dir"
    echo "$dir $bin" >>"$WORK/clusters"
    as_pg "$bin/initdb" -D "$dir" -U postgres --pwfile="$WORK/pwfile" \
        --auth-host=scram-sha-256 --auth-local=trust -E UTF8 --locale=C >"$WORK/logs/initdb-$name.log" 2>&1 \
        || die "initdb of $name failed: $(tail -n 5 "$WORK/logs/initdb-$name.log")"
    local workers=$((JOBS + 6)); [ $workers -lt 8 ] && workers=8
    local lrworkers=$((JOBS + 2)); [ $lrworkers -lt 4 ] && lrworkers=4
    # PostgreSQL 16+: room for streaming = parallel's apply workers (2 by default)
    if [ "$bin" != "$PGBIN" ]; then lrworkers=$((lrworkers + 2)); workers=$((workers + 2)); fi
    cat >>"$dir/postgresql.conf" <<EOF

# ---- walshuttle bench/compare.sh: identical on source and target ----
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
max_worker_processes = $workers
max_logical_replication_workers = $lrworkers
max_sync_workers_per_subscription = $JOBS
EOF
    # --many-tables: thousands of tables in one snapshot or schema transaction
    [ "$MANY" = 1 ] && echo "max_locks_per_transaction = 256" >>"$dir/postgresql.conf"
    : >"$WORK/$name.log"
    [ "$IS_ROOT" = 1 ] && chown postgres "$WORK/$name.log"
    as_pg "$bin/pg_ctl" -D "$dir" -l "$WORK/$name.log" -w -t 60 start >/dev/null \
        || die "starting $name failed: $(tail -n 5 "$WORK/$name.log")"
}

# psql helpers: q PORT [DB] -c ... ; qs/qt run one statement on source/target bench
q() { local port=$1 db=$2; shift 2; "$PSQL" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$db" "$@"; }
# DB: the database every helper works on (bench; tpcb, many, mixed in their parts)
DB=bench
qs() { q "$SP" "$DB" -c "$1"; }
qt() { q "$TP" "$DB" -c "$1"; }
qs_admin() { q "$SP" postgres -c "$1"; }
qt_admin() { q "$TP" postgres -c "$1"; }
checkpoint_both() { qs_admin "CHECKPOINT" >/dev/null; qt_admin "CHECKPOINT" >/dev/null; }

SP=$(next_port "$BASE_PORT")
TP=$(next_port $((SP + 1)))
SP15=$SP; TP15=$TP; SP17=""; TP17=""
set_urls() {
    SRC_URL="postgresql://postgres:$PASSWORD@127.0.0.1:$SP/$DB"
    TGT_URL="postgresql://postgres:$PASSWORD@127.0.0.1:$TP/$DB"
    SRC_CONNINFO="host=127.0.0.1 port=$SP dbname=$DB user=postgres password=$PASSWORD"
}
set_urls
# use_pair 15|17 [DB]: point every helper at one pair of clusters and one database
use_pair() {
    case "$1" in
        15) SP=$SP15; TP=$TP15 ;;
        17) SP=$SP17; TP=$TP17 ;;
    esac
    DB=${2:-bench}
    set_urls
}

log "workspace $WORK; source on port $SP, target on port $TP; fsync $([ "$FAST" = 1 ] && echo off || echo on)"
start_cluster source "$SP"
start_cluster target "$TP"
PG_VERSION=$(qs_admin "SHOW server_version")
qs_admin "CREATE DATABASE bench" >/dev/null
qt_admin "CREATE DATABASE bench" >/dev/null

# ------------------------------------------------------------------- data ----
log "loading the demo schema and data (scale $SCALE = $ROWS recommendation rows)"
t0=$(now)
q "$SP" bench -f "$REPO/migrations/schema.sql" >/dev/null
q "$SP" bench -v scale="$SCALE" -f "$REPO/migrations/generate.sql" >"$WORK/logs/generate.log"
# the heartbeat table (steady-state lag in seconds, catch-up markers); it must exist
# before any replicator starts, since DDL is not replicated
qs "CREATE TABLE public.bench_heartbeat (id int PRIMARY KEY, seq bigint NOT NULL, ts timestamptz NOT NULL);
    INSERT INTO public.bench_heartbeat VALUES (1, 0, clock_timestamp());" >/dev/null
# set hint bits and the visibility map now, so no measured run pays for them
qs "VACUUM (FREEZE, ANALYZE)" >/dev/null
t1=$(now)
SRC_ROWS=$(qs "SELECT count(*) FROM recommendations")
DB_BYTES=$(qs "SELECT pg_database_size('bench')")
DB_PRETTY=$(qs "SELECT pg_size_pretty(pg_database_size('bench'))")
REC_PRETTY=$(qs "SELECT pg_size_pretty(pg_total_relation_size('recommendations'))")
TABLES=$(qs "SELECT string_agg(quote_ident(schemaname) || '.' || quote_ident(tablename), ' ' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'")
NTABLES=$(qs "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
log "source data: $DB_PRETTY database (recommendations $REC_PRETTY with indexes), $SRC_ROWS recommendation rows, loaded in $(elapsed "$t0" "$t1") s"
echo "source database size: $DB_PRETTY ($DB_BYTES bytes); recommendations: $SRC_ROWS rows, $REC_PRETTY"
# pristine copy: the streaming runs reset the source from it, so each starts from
# the same data (the bulk insert and the updates change the source)
qs_admin "CREATE DATABASE bench_tpl TEMPLATE bench STRATEGY FILE_COPY" >/dev/null

SCHEMA_PRE="$WORK/schema-pre.sql"; SCHEMA_POST="$WORK/schema-post.sql"
"$PGBIN/pg_dump" -h 127.0.0.1 -p "$SP" -U postgres -d bench --schema-only --no-owner --no-acl --section=pre-data >"$SCHEMA_PRE"
"$PGBIN/pg_dump" -h 127.0.0.1 -p "$SP" -U postgres -d bench --schema-only --no-owner --no-acl --section=post-data >"$SCHEMA_POST"

# ---------------------------------------------------------------- helpers ----
# Drops every subscription on the target, every slot and publication in the
# source's bench database, then recreates the target's bench database.
reset_target() {
    local subs s
    subs=$(q "$TP" "$DB" -c "SELECT subname FROM pg_subscription WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())" 2>/dev/null || true)
    for s in $subs; do
        qt "ALTER SUBSCRIPTION $s DISABLE" >/dev/null
        qt "ALTER SUBSCRIPTION $s SET (slot_name = NONE)" >/dev/null
        qt "DROP SUBSCRIPTION $s" >/dev/null
    done
    drop_source_replication
    PGOPTIONS="-c client_min_messages=warning" qt_admin "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
    qt_admin "CREATE DATABASE $DB" >/dev/null
}
# drop_slots_where COND: terminates the walsenders of the source's slots matching the
# SQL condition COND on pg_replication_slots, waits for them to let go, drops the slots
drop_slots_where() {
    local i
    qs_admin "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE $1 AND active_pid IS NOT NULL" >/dev/null
    for i in $(seq 1 100); do
        [ "$(qs_admin "SELECT count(*) FROM pg_replication_slots WHERE $1 AND active")" = 0 ] && break
        sleep 0.1
    done
    qs_admin "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE $1" >/dev/null
}
drop_source_replication() {
    drop_slots_where "database = '$DB'"
    qs "DO \$\$ DECLARE p text; BEGIN FOR p IN SELECT pubname FROM pg_publication LOOP EXECUTE format('DROP PUBLICATION %I', p); END LOOP; END \$\$" >/dev/null
}
# free_slot NAME: drops that slot on the source cluster, whichever database holds it
# (slot names are cluster-wide; a part that stopped early may have left one)
free_slot() { drop_slots_where "slot_name = '$1'"; }
reset_source() {
    drop_source_replication
    qs_admin "DROP DATABASE $DB WITH (FORCE)" >/dev/null
    qs_admin "CREATE DATABASE $DB TEMPLATE ${DB}_tpl STRATEGY FILE_COPY" >/dev/null
}

# poll_until PORT SQL TIMEOUT [INTERVAL]: SQL must return `bool`; one psql session
# runs it every INTERVAL seconds (\watch) and this prints the server's epoch time of
# the first true row, or nothing on timeout.
poll_until() {
    local port=$1 sql=$2 timeout=$3 interval=${4:-0.05}
    { printf 'SELECT extract(epoch FROM clock_timestamp()), (%s)\n\\watch %s\n' "$sql" "$interval" |
        timeout "$timeout" "$PSQL" -X -At -F ' ' -h 127.0.0.1 -p "$port" -U postgres -d "$DB" 2>>"$WORK/logs/poll.log" || true; } |
        { while read -r ts ok; do
              if [ "$ok" = t ]; then echo "$ts"; break; fi
          done; }
}

# VmHWM (peak RSS) of a live process, in KiB
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true; }
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# watchdog PID SECONDS HWMFILE: samples VmHWM into HWMFILE every 50 ms while PID
# lives; sends SIGTERM (then SIGKILL) if it outlives SECONDS.
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

# source-side checksum of recommendations' (id, score) vs the target's
rec_checksum_sql="SELECT count(*) || ':' || coalesce(sum(hashtext(id::text || '/' || score::text)::bigint), 0) FROM recommendations"
check_consistent() {   # tool phase
    local s t
    s=$(qs "$rec_checksum_sql"); t=$(qt "$rec_checksum_sql")
    if [ "$s" = "$t" ]; then
        record "consistent_after_$2" "$1" true
    else
        record "consistent_after_$2" "$1" false
        broke "$1: after $2 the target's recommendations (count:hash $t) differ from the source's ($s)"
    fi
}
# all tables' row counts equal on both sides (after an initial copy)
check_counts() {   # tool
    local t s d bad=""
    for t in $TABLES; do
        s=$(qs "SELECT count(*) FROM $t"); d=$(qt "SELECT count(*) FROM $t" 2>/dev/null || echo missing)
        [ "$s" = "$d" ] || bad="$bad $t(source $s, target $d)"
    done
    if [ -n "$bad" ]; then broke "$1: initial copy row counts differ:$bad"; return 1; fi
    local idx
    idx=$(qt "SELECT count(*) FROM pg_indexes WHERE schemaname = 'public'")
    record initial_copy_target_indexes "$1" "$idx"
}

MARK_SEQ=0
# bumps the heartbeat row in its own source transaction; prints its seq
source_marker() { qs "UPDATE bench_heartbeat SET seq = seq + 1, ts = clock_timestamp() WHERE id = 1 RETURNING seq"; }
# waits until the target's heartbeat row reached seq; prints the epoch of that
wait_marker() {   # seq timeout
    poll_until "$TP" "coalesce((SELECT seq >= $1 FROM bench_heartbeat WHERE id = 1), false)" "$2"
}

percentile() {   # q file -> nearest-rank percentile of the numbers in file
    sort -g "$2" | awk -v q="$1" '{ v[NR] = $1 } END { if (NR == 0) exit; i = int(q * NR); if (i < q * NR) i++; if (i < 1) i = 1; print v[i] }'
}

write_pgbench_scripts() {
    printf '\\set id random(1, %s)\nUPDATE recommendations SET score = random(), updated_at = now() WHERE id = :id;\n' "$ROWS" >"$WORK/update.sql"
}
write_pgbench_scripts

BULK_SQL="INSERT INTO recommendations (user_id, product_id, score, rank, model_version, features, created_at, updated_at)
SELECT 1 + (g % ($SCALE * 1000)), 1 + (g % greatest($SCALE * 100, 10)), round(random()::numeric, 6)::float8, 1 + (g % 20), 'model-bulk-1',
       jsonb_build_object('ctr', round((random() / 4)::numeric, 4), 'source', 'bulk', 'dwell_s', g % 120, 'cold_start', false),
       now(), now()
FROM generate_series(1, $BULK_ROWS) AS g"

# bulk_apply TOOL: one source transaction of BULK_ROWS inserts; time until visible on the target
bulk_apply() {
    local tool=$1 before t_start t_commit maxid seen count
    before=$(qs "SELECT count(*) FROM recommendations")
    checkpoint_both
    log "$tool: bulk apply: one transaction inserting $BULK_ROWS rows"
    t_start=$(now)
    qs "$BULK_SQL" >/dev/null
    t_commit=$(now)
    drain_cpu_begin
    maxid=$(qs "SELECT max(id) FROM recommendations")
    seen=$(poll_until "$TP" "coalesce((SELECT max(id) FROM recommendations), 0) >= $maxid" 900)
    [ -n "$seen" ] || { broke "$tool: bulk apply: target did not show the inserted rows within 900 s"; return 1; }
    count=$(qt "SELECT count(*) FROM recommendations")
    [ "$count" = $((before + BULK_ROWS)) ] || broke "$tool: bulk apply: target has $count rows, expected $((before + BULK_ROWS))"
    record bulk_source_txn_s "$tool" "$(elapsed "$t_start" "$t_commit")"
    record bulk_apply_from_commit_s "$tool" "$(elapsed "$t_commit" "$seen")"
    drain_cpu_record "$tool" bulk_after_commit "$(elapsed "$t_commit" "$seen")"
    record bulk_apply_from_start_s "$tool" "$(elapsed "$t_start" "$seen")"
    log "$tool: bulk apply: source txn $(elapsed "$t_start" "$t_commit") s; visible on target $(elapsed "$t_commit" "$seen") s after COMMIT returned"
}

# backlog_write TOOL: BACKLOG_TXNS single-row update transactions while the replicator is stopped;
# sets MARK_SEQ to the marker written after them
backlog_write() {
    local tool=$1 lsn0 lsn1 t0 t1
    lsn0=$(qs "SELECT pg_current_wal_lsn()")
    log "$tool: backlog: writing $BACKLOG_TXNS single-row UPDATE transactions (replicator stopped)"
    t0=$(now)
    "$PGBIN/pgbench" -n -h 127.0.0.1 -p "$SP" -U postgres -f "$WORK/update.sql" -t "$BACKLOG_TXNS" -c 1 bench >"$WORK/logs/pgbench-backlog-$tool.log" 2>&1 \
        || { broke "$tool: pgbench (backlog) failed: $(tail -n 3 "$WORK/logs/pgbench-backlog-$tool.log")"; return 1; }
    t1=$(now)
    MARK_SEQ=$(source_marker)
    lsn1=$(qs "SELECT pg_current_wal_lsn()")
    record backlog_write_s "$tool" "$(elapsed "$t0" "$t1")"
    record backlog_wal_bytes "$tool" "$(qs "SELECT pg_wal_lsn_diff('$lsn1', '$lsn0')::bigint")"
    echo "$MARK_SEQ" >"$WORK/mark_seq"
    checkpoint_both
}

# idle_latency TOOL: 10 single-row transactions on an idle source, 0.5 s apart; time
# from each COMMIT returning until the target shows it
idle_latency() {
    local tool=$1 i seq t0 seen
    local f="$WORK/idle-latency-$tool.txt"
    : >"$f"
    log "$tool: idle latency: 10 single-row transactions, 0.5 s apart"
    for i in $(seq 1 10); do
        sleep 0.5
        seq=$(source_marker); t0=$(now)
        seen=$(wait_marker "$seq" 60)
        [ -n "$seen" ] || { broke "$tool: idle latency: transaction $i not visible on the target within 60 s"; return 1; }
        elapsed "$t0" "$seen" >>"$f"; echo >>"$f"
    done
    record idle_txn_latency_p50_s "$tool" "$(percentile 0.50 "$f")"
    record idle_txn_latency_max_s "$tool" "$(sort -g "$f" | tail -n 1)"
    cp "$f" "$WORK/logs/" 2>/dev/null || true
    log "$tool: idle latency p50 $(percentile 0.50 "$f") s, max $(sort -g "$f" | tail -n 1) s"
}

# steady_state TOOL SLOT: pgbench -R at a fixed rate; lag sampled every second
steady_state() {
    local tool=$1 slot=$2 hbpid pbpid i next b s tps seq seen t_end
    local bytes="$WORK/lag-bytes-$tool.txt" secs="$WORK/lag-seconds-$tool.txt"
    : >"$bytes"; : >"$secs"
    log "$tool: steady state: pgbench -R $STEADY_RATE -T $STEADY_SECONDS, lag sampled every second"
    # heartbeat: a source session bumps bench_heartbeat.ts every 100 ms, one commit each
    q "$SP" bench -c "DO \$\$ DECLARE stop timestamptz := clock_timestamp() + interval '$((STEADY_SECONDS + 4)) seconds';
        BEGIN WHILE clock_timestamp() < stop LOOP
            UPDATE bench_heartbeat SET seq = seq + 1, ts = clock_timestamp() WHERE id = 1; COMMIT;
            PERFORM pg_sleep(0.1);
        END LOOP; END \$\$" >"$WORK/logs/heartbeat-$tool.log" 2>&1 &
    hbpid=$!; track "$hbpid"
    sleep 1
    "$PGBIN/pgbench" -n -h 127.0.0.1 -p "$SP" -U postgres -f "$WORK/update.sql" -R "$STEADY_RATE" -T "$STEADY_SECONDS" -c 4 -j 2 bench \
        >"$WORK/logs/pgbench-steady-$tool.log" 2>&1 &
    pbpid=$!; track "$pbpid"
    next=$(date +%s); next=$((next + 1))
    for i in $(seq 1 "$STEADY_SECONDS"); do
        while [ "$(date +%s)" -lt "$next" ]; do sleep 0.02; done
        next=$((next + 1))
        b=$(qs "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), -1)::bigint FROM pg_replication_slots WHERE slot_name = '$slot'")
        s=$(qt "SELECT round(extract(epoch FROM clock_timestamp() - ts)::numeric, 3) FROM bench_heartbeat WHERE id = 1")
        echo "$b" >>"$bytes"; echo "$s" >>"$secs"
    done
    wait "$pbpid" || { broke "$tool: pgbench (steady) failed: $(tail -n 3 "$WORK/logs/pgbench-steady-$tool.log")"; }
    wait "$hbpid" || true
    tps=$(awk '/^tps = / { print $3; exit }' "$WORK/logs/pgbench-steady-$tool.log")
    record steady_pgbench_tps "$tool" "${tps:-null}"
    record steady_lag_bytes_p50 "$tool" "$(percentile 0.50 "$bytes")"
    record steady_lag_bytes_p99 "$tool" "$(percentile 0.99 "$bytes")"
    record steady_lag_bytes_max "$tool" "$(sort -g "$bytes" | tail -n 1)"
    record steady_lag_seconds_p50 "$tool" "$(percentile 0.50 "$secs")"
    record steady_lag_seconds_p99 "$tool" "$(percentile 0.99 "$secs")"
    record steady_lag_seconds_max "$tool" "$(sort -g "$secs" | tail -n 1)"
    cp "$bytes" "$secs" "$WORK/logs/" 2>/dev/null || true
    # final catch-up, then the data must match
    seq=$(source_marker); t_end=$(now)
    seen=$(wait_marker "$seq" 300)
    [ -n "$seen" ] || { broke "$tool: steady state: target did not catch up within 300 s after the load"; return 1; }
    record steady_final_catchup_s "$tool" "$(elapsed "$t_end" "$seen")"
    check_consistent "$tool" steady_state
    log "$tool: steady state: lag p50 $(percentile 0.50 "$secs") s / $(percentile 0.50 "$bytes") B, p99 $(percentile 0.99 "$secs") s / $(percentile 0.99 "$bytes") B; pgbench $tps tps"
}

# ------------------------------------------------------ walshuttle process ---
WS_PID=""
WS_TOOL=walshuttle   # the tool name ws_stop records under (walshuttle17 on the 17 pair)
WS_RUN_BIN=""        # the binary of ws_start_run (default $WS; the profiling one for TPC-B)
ws_start_run() {   # logname
    # shellcheck disable=SC2086  # WALSHUTTLE_RUN_ARGS: extra flags, split on spaces
    "${WS_RUN_BIN:-$WS}" --source "$SRC_URL" --target "$TGT_URL" run ${WALSHUTTLE_RUN_ARGS:-} >"$WORK/logs/$1.log" 2>&1 &
    WS_PID=$!; track "$WS_PID"
}
# waits until the walshuttle slot has an active consumer
ws_wait_streaming() {
    local seen
    seen=$(poll_until "$SP" "EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'walshuttle' AND active)" 120 0.1)
    if [ -z "$seen" ] || ! kill -0 "$WS_PID" 2>/dev/null; then
        broke "walshuttle run did not start streaming within 120 s: $(tail -n 5 "$WORK/logs/$1.log" | tr '\n' ' ')"
        return 1
    fi
}
# SIGTERM, wait for the exit (60 s), record the peak RSS read just before
ws_stop() {   # phase logname
    local phase=$1 name=$2 hwm rc=0 i
    hwm=$(hwm_kib "$WS_PID")
    if ! kill -0 "$WS_PID" 2>/dev/null; then
        wait "$WS_PID" || rc=$?
        broke "walshuttle run ($name) had already exited (code $rc) before it was stopped: $(tail -n 5 "$WORK/logs/$name.log" | tr '\n' ' ')"
        return 1
    fi
    [ -n "$hwm" ] && record "peak_rss_mib_$phase" "$WS_TOOL" "$(kib_to_mib "$hwm")"
    local t0; t0=$(now)
    kill -TERM "$WS_PID"
    for i in $(seq 1 600); do kill -0 "$WS_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$WS_PID" 2>/dev/null; then
        kill -KILL "$WS_PID" 2>/dev/null || true
        wait "$WS_PID" 2>/dev/null || true
        broke "walshuttle run ($name) did not exit within 60 s of SIGTERM (killed): $(tail -n 5 "$WORK/logs/$name.log" | tr '\n' ' ')"
        return 1
    fi
    wait "$WS_PID" || rc=$?
    record "sigterm_exit_s_$phase" "$WS_TOOL" "$(elapsed "$t0" "$(now)")"
    if [ "$rc" != 0 ]; then
        broke "walshuttle run ($name) exited $rc on SIGTERM: $(tail -n 5 "$WORK/logs/$name.log" | tr '\n' ' ')"
        return 1
    fi
    WS_PID=""
}

# =========================================================== measurements ====
set_step() { echo "$1" >"$WORK/step"; }

loadavg() { cut -d' ' -f1 /proc/loadavg; }
# wait_quiet LABEL: with --wait-load, wait (polling every 30 s, at most --wait-max s)
# until the 1-minute load average is below the limit; notes when it never was
wait_quiet() {
    local label=$1 start l
    [ -n "$WAIT_LOAD" ] || return 0
    start=$(date +%s)
    while :; do
        l=$(loadavg)
        if awk -v l="$l" -v m="$WAIT_LOAD" 'BEGIN { exit !(l < m) }'; then break; fi
        if [ $(( $(date +%s) - start )) -ge "$WAIT_MAX" ]; then
            note "$label: the 1-minute load average stayed at or above $WAIT_LOAD for $WAIT_MAX s (now $l); measured anyway"
            break
        fi
        log "$label: load average $l, waiting for it to drop below $WAIT_LOAD"
        sleep 30
    done
}
# around each timed initial copy: the wait for a quiet machine, a CHECKPOINT on both
# clusters, and the load average when the clock starts and stops
copy_clock_start() {
    wait_quiet "$1 initial copy"
    checkpoint_both
    record initial_copy_load_start "$1" "$(loadavg)"
}
copy_clock_end() { record initial_copy_load_end "$1" "$(loadavg)"; }

# --- pgcopydb -----------------------------------------------------------------
run_pgcopydb() {
    set_step "pgcopydb clone"
    if ! command -v pgcopydb >/dev/null 2>&1; then
        note "SKIP pgcopydb: not installed (apt-get install -y pgcopydb)"
        return 0
    fi
    reset_target; checkpoint_both
    local dir="$WORK/pgcopydb" t0 t1 rc=0 split_opt=()
    rm -rf "$dir"
    if pgcopydb clone --help 2>&1 | grep -q -- --split-tables-larger-than; then
        split_opt=(--split-tables-larger-than "$SPLIT_THRESHOLD")
    else
        note "pgcopydb $(pgcopydb --version 2>&1 | awk '/^pgcopydb version/ { print $3 }') has no --split-tables-larger-than: one job per table"
    fi
    log "pgcopydb: clone --table-jobs $JOBS --index-jobs $JOBS ${split_opt[*]}"
    copy_clock_start pgcopydb
    t0=$(now)
    pgcopydb clone --source "$SRC_URL" --target "$TGT_URL" --dir "$dir" \
        --table-jobs "$JOBS" --index-jobs "$JOBS" "${split_opt[@]}" \
        --no-owner --no-acl --no-comments --skip-extensions >"$WORK/logs/pgcopydb.log" 2>&1 || rc=$?
    t1=$(now)
    copy_clock_end pgcopydb
    if [ "$rc" != 0 ]; then
        broke "pgcopydb clone exited $rc: $(grep -E 'ERROR|FATAL' "$WORK/logs/pgcopydb.log" | tail -n 3 | tr '\n' ' ')"
        return 0
    fi
    check_counts pgcopydb || return 0
    record initial_copy_s pgcopydb "$(elapsed "$t0" "$t1")"
    log "pgcopydb: initial copy $(elapsed "$t0" "$t1") s"
}

# --- psql \copy pipe ------------------------------------------------------------
run_psql_pipe() {
    set_step "psql pipe"
    reset_target
    q "$TP" bench -f "$SCHEMA_PRE" >/dev/null 2>"$WORK/logs/psql-pipe-schema.log"
    checkpoint_both
    local t0 t1 t2 t
    log "psql pipe: sequential \\copy per table, then the post-data schema (keys, indexes)"
    copy_clock_start psql_pipe
    t0=$(now)
    for t in $TABLES; do
        "$PSQL" -X -q -h 127.0.0.1 -p "$SP" -U postgres -d bench -c "\\copy $t to stdout" |
            "$PSQL" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$TP" -U postgres -d bench -c "\\copy $t from stdin"
    done
    t1=$(now)
    q "$TP" bench -f "$SCHEMA_POST" >/dev/null 2>>"$WORK/logs/psql-pipe-schema.log"
    t2=$(now)
    copy_clock_end psql_pipe
    check_counts psql_pipe || return 0
    record initial_copy_s psql_pipe "$(elapsed "$t0" "$t2")"
    record initial_copy_data_only_s psql_pipe "$(elapsed "$t0" "$t1")"
    record initial_copy_index_build_s psql_pipe "$(elapsed "$t1" "$t2")"
    log "psql pipe: initial copy $(elapsed "$t0" "$t2") s (data $(elapsed "$t0" "$t1") s + keys/indexes $(elapsed "$t1" "$t2") s)"
}

# --- walshuttle: bootstrap, bulk apply, backlog drain, steady state ------------
run_walshuttle() { walshuttle_all 15 walshuttle; }
run_walshuttle17() { walshuttle_all 17 walshuttle17; }
walshuttle_all() {   # pair tool
    use_pair "$1"
    local tool=$2
    WS_TOOL=$tool
    set_step "$tool: reset"
    reset_target; reset_source; checkpoint_both
    set_step "$tool bootstrap"
    log "$tool: bootstrap --jobs $JOBS"
    local t0 t1 rc=0 wd seen
    copy_clock_start "$tool"
    t0=$(now)
    "$WS" --source "$SRC_URL" --target "$TGT_URL" bootstrap --jobs "$JOBS" >"$WORK/logs/$tool-bootstrap.log" 2>&1 &
    local pid=$!; track "$pid"
    watchdog "$pid" 900 "$WORK/hwm-bootstrap-$tool" & wd=$!; track "$wd"
    wait "$pid" || rc=$?
    t1=$(now)
    copy_clock_end "$tool"
    wait "$wd" 2>/dev/null || true
    [ -f "$WORK/hwm-bootstrap-$tool" ] && record peak_rss_mib_bootstrap "$tool" "$(kib_to_mib "$(cat "$WORK/hwm-bootstrap-$tool")")"
    if [ -f "$WORK/hwm-bootstrap-$tool.timeout" ]; then
        broke "$tool bootstrap did not finish within 900 s (killed): $(tail -n 5 "$WORK/logs/$tool-bootstrap.log" | tr '\n' ' ')"
        return 1
    fi
    if [ "$rc" != 0 ]; then
        broke "$tool bootstrap exited $rc: $(tail -n 5 "$WORK/logs/$tool-bootstrap.log" | tr '\n' ' ')"
        return 1
    fi
    check_counts "$tool"
    record initial_copy_s "$tool" "$(elapsed "$t0" "$t1")"
    log "$tool: initial copy $(elapsed "$t0" "$t1") s"
    [ "$ONLY" = copy ] && return 0

    set_step "$tool: bulk apply"
    ws_start_run "$tool-run-bulk"
    ws_wait_streaming "$tool-run-bulk"
    sleep 2
    bulk_apply "$tool"
    set_step "$tool: backlog drain"
    ws_stop bulk_apply "$tool-run-bulk"
    backlog_write "$tool"
    log "$tool: backlog: starting walshuttle run again"
    decode_alone_begin
    drain_cpu_begin
    t0=$(now)
    ws_start_run "$tool-run-backlog"
    seen=$(wait_marker "$MARK_SEQ" 900)
    [ -n "$seen" ] || { broke "$tool: backlog not drained within 900 s: $(tail -n 5 "$WORK/logs/$tool-run-backlog.log" | tr '\n' ' ')"; return 1; }
    record backlog_drain_s "$tool" "$(elapsed "$t0" "$seen")"
    drain_cpu_record "$tool" backlog "$(elapsed "$t0" "$seen")"
    log "$tool: backlog drained in $(elapsed "$t0" "$seen") s (from process start)"
    check_consistent "$tool" backlog_drain
    ws_stop backlog_drain "$tool-run-backlog"
    decode_alone "$tool" backlog

    set_step "$tool: steady state"
    ws_start_run "$tool-run-steady"
    ws_wait_streaming "$tool-run-steady"
    seen=$(wait_marker "$(source_marker)" 120)
    [ -n "$seen" ] || { broke "$tool: not caught up before the steady-state load"; return 1; }
    idle_latency "$tool"
    steady_state "$tool" walshuttle
    ws_stop steady_state "$tool-run-steady"
    drop_source_replication
}

# --- native logical replication ----------------------------------------------------
run_native() { native_all 15 native "streaming = $NATIVE_STREAMING"; }
# PostgreSQL 17, as a careful operator sets it up: binary COPY and transfer, large
# transactions applied by parallel workers while they stream
run_native17() { native_all 17 native17 "binary = true, streaming = parallel"; }
native_all() {   # pair tool subscription-options
    use_pair "$1"
    local tool=$2 subopts=$3
    set_step "$tool: reset"
    reset_target; reset_source
    q "$TP" bench -f "$SCHEMA_PRE" >/dev/null 2>"$WORK/logs/$tool-schema.log"
    q "$TP" bench -f "$SCHEMA_POST" >/dev/null 2>>"$WORK/logs/$tool-schema.log"
    qs "CREATE PUBLICATION bench_pub FOR ALL TABLES" >/dev/null
    checkpoint_both
    set_step "$tool: initial copy"
    log "$tool: CREATE SUBSCRIPTION ... WITH (copy_data = true, $subopts)"
    local t0 t1 seen
    copy_clock_start "$tool"
    t0=$(now)
    qt "CREATE SUBSCRIPTION bench_sub CONNECTION '$SRC_CONNINFO' PUBLICATION bench_pub WITH (copy_data = true, $subopts)" >/dev/null 2>>"$WORK/logs/$tool-schema.log"
    seen=$(poll_until "$TP" "(SELECT count(*) FILTER (WHERE srsubstate = 'r') = $NTABLES AND count(*) = $NTABLES FROM pg_subscription_rel)" 1800 0.05)
    copy_clock_end "$tool"
    [ -n "$seen" ] || { broke "$tool: subscription tables not all ready within 1800 s"; return 1; }
    record initial_copy_s "$tool" "$(elapsed "$t0" "$seen")"
    log "$tool: initial copy $(elapsed "$t0" "$seen") s"
    check_counts "$tool"
    [ "$ONLY" = copy ] && return 0

    set_step "$tool: bulk apply"
    seen=$(poll_until "$SP" "EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'bench_sub' AND active)" 120 0.1)
    [ -n "$seen" ] || { broke "$tool: apply worker not streaming"; return 1; }
    sleep 2
    bulk_apply "$tool"

    set_step "$tool: backlog drain"
    settle_slot bench_sub
    qt "ALTER SUBSCRIPTION bench_sub DISABLE" >/dev/null
    seen=$(poll_until "$SP" "NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'bench_sub' AND active)" 120 0.1)
    [ -n "$seen" ] || { broke "$tool: apply worker did not stop after DISABLE"; return 1; }
    backlog_write "$tool"
    log "$tool: backlog: ALTER SUBSCRIPTION ... ENABLE"
    drain_cpu_begin
    t0=$(now)
    qt "ALTER SUBSCRIPTION bench_sub ENABLE" >/dev/null
    seen=$(wait_marker "$MARK_SEQ" 900)
    [ -n "$seen" ] || { broke "$tool: backlog not drained within 900 s"; return 1; }
    record backlog_drain_s "$tool" "$(elapsed "$t0" "$seen")"
    drain_cpu_record "$tool" backlog "$(elapsed "$t0" "$seen")"
    log "$tool: backlog drained in $(elapsed "$t0" "$seen") s (from ENABLE)"
    check_consistent "$tool" backlog_drain

    set_step "$tool: steady state"
    idle_latency "$tool"
    steady_state "$tool" bench_sub
    local wrss
    wrss=$(qt "SELECT pid FROM pg_stat_subscription WHERE subname = 'bench_sub' AND relid IS NULL" || true)
    if [ -n "$wrss" ] && [ -r "/proc/$wrss/status" ]; then
        record peak_rss_mib_steady_state "${tool}_apply_worker" "$(kib_to_mib "$(hwm_kib "$wrss")")"
    fi
    # done: no apply worker may stay behind while other parts are measured
    reset_target
}

# --- the floor: the target alone loading local files ------------------------------
# The source's rows are written beforehand (untimed) by COPY TO, in binary, into J
# files per table (pages split modulo J); then, timed, J sessions on the target each
# run one COPY FROM per table of its share, and J sessions build the keys' unique
# indexes and the other indexes (biggest table first, round robin), then the keys are
# attached (ADD CONSTRAINT ... USING INDEX) and any other constraint added.
run_floor() {
    use_pair 15
    set_step "floor: files"
    local dir="$WORK/floor" t k i n stmt t0 t1 t2 pids=() rc=0
    rm -rf "$dir"; mkdir -p "$dir"; [ "$IS_ROOT" = 1 ] && chown postgres "$dir"
    for t in $TABLES; do
        for k in $(seq 0 $((JOBS - 1))); do
            qs "COPY (SELECT * FROM $t WHERE ((ctid::text::point)[0])::bigint % $JOBS = $k) TO '$dir/$t.$k' (FORMAT binary)" >/dev/null
        done
    done
    record floor_file_bytes floor "$(du -sb "$dir" | cut -f1)"
    # the target's work, one SQL file per worker
    for k in $(seq 0 $((JOBS - 1))); do
        : >"$dir/load-$k.sql"
        for t in $TABLES; do echo "COPY $t FROM '$dir/$t.$k' (FORMAT binary);" >>"$dir/load-$k.sql"; done
        : >"$dir/index-$k.sql"
    done
    # unique indexes of primary keys / unique constraints, and plain indexes, biggest
    # table first; then the constraints that attach them, and any other constraint
    i=0
    while IFS= read -r stmt; do
        [ -n "$stmt" ] || continue
        echo "$stmt" >>"$dir/index-$((i % JOBS)).sql"; i=$((i + 1))
    done < <(qs "SELECT pg_get_indexdef(x.indexrelid) || ';'
                   FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
                  WHERE c.relnamespace = 'public'::regnamespace
                  ORDER BY pg_relation_size(x.indrelid) DESC, c.relname")
    qs "SELECT format('ALTER TABLE %s ADD CONSTRAINT %I %s USING INDEX %I;', conrelid::regclass, conname,
                      CASE contype WHEN 'p' THEN 'PRIMARY KEY' ELSE 'UNIQUE' END, (SELECT relname FROM pg_class WHERE oid = conindid))
          FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND contype IN ('p', 'u')
        UNION ALL
        SELECT format('ALTER TABLE %s ADD CONSTRAINT %I %s;', conrelid::regclass, conname, pg_get_constraintdef(oid))
          FROM pg_constraint WHERE connamespace = 'public'::regnamespace AND contype IN ('f', 'x')" >"$dir/constraints.sql"
    [ "$IS_ROOT" = 1 ] && chown -R postgres "$dir"
    reset_target
    q "$TP" bench -f "$SCHEMA_PRE" >/dev/null 2>"$WORK/logs/floor-schema.log"
    set_step "floor: load"
    log "floor: $JOBS sessions, one COPY FROM (binary, local file) per table each, then keys and indexes in $JOBS sessions"
    copy_clock_start floor
    t0=$(now)
    for k in $(seq 0 $((JOBS - 1))); do
        q "$TP" bench -f "$dir/load-$k.sql" >>"$WORK/logs/floor.log" 2>&1 & pids+=($!); track $!
    done
    for i in "${pids[@]}"; do wait "$i" || rc=1; done
    t1=$(now)
    pids=()
    for k in $(seq 0 $((JOBS - 1))); do
        q "$TP" bench -f "$dir/index-$k.sql" >>"$WORK/logs/floor.log" 2>&1 & pids+=($!); track $!
    done
    for i in "${pids[@]}"; do wait "$i" || rc=1; done
    q "$TP" bench -f "$dir/constraints.sql" >>"$WORK/logs/floor.log" 2>&1 || rc=1
    t2=$(now)
    copy_clock_end floor
    rm -f "$dir"/*.[0-9]*
    [ "$rc" = 0 ] || { broke "floor: a COPY FROM or an index build failed: $(tail -n 3 "$WORK/logs/floor.log" | tr '\n' ' ')"; return 1; }
    check_counts floor || return 0
    record initial_copy_s floor "$(elapsed "$t0" "$t2")"
    record initial_copy_data_only_s floor "$(elapsed "$t0" "$t1")"
    record initial_copy_index_build_s floor "$(elapsed "$t1" "$t2")"
    log "floor: $(elapsed "$t0" "$t2") s (data $(elapsed "$t0" "$t1") s + keys/indexes $(elapsed "$t1" "$t2") s)"
}

# --- PostgreSQL 17 pair -------------------------------------------------------------
# Two more clusters from PG17_HOME with the same settings; the bench database is
# restored from the 15 source's template (pg_dump 15 | psql), so it holds the same rows.
setup_pg17() {
    set_step "pg17: clusters"
    SP17=$(next_port $((TP15 + 1)))
    TP17=$(next_port $((SP17 + 1)))
    log "PostgreSQL 17 pair: source on port $SP17, target on port $TP17 ($PG17_HOME)"
    start_cluster source17 "$SP17" "$PG17_HOME/bin"
    start_cluster target17 "$TP17" "$PG17_HOME/bin"
    use_pair 17
    PG17_VERSION=$(qs_admin "SHOW server_version")
    qs_admin "CREATE DATABASE bench" >/dev/null
    qt_admin "CREATE DATABASE bench" >/dev/null
    set_step "pg17: data"
    local t0; t0=$(now)
    "$PGBIN/pg_dump" -h 127.0.0.1 -p "$SP15" -U postgres -d bench_tpl --no-owner --no-acl 2>"$WORK/logs/pg17-load.log" |
        q "$SP" bench >/dev/null 2>>"$WORK/logs/pg17-load.log" || die "loading the 17 source failed: $(tail -n 3 "$WORK/logs/pg17-load.log")"
    qs "VACUUM (FREEZE, ANALYZE)" >/dev/null
    qs_admin "CREATE DATABASE bench_tpl TEMPLATE bench STRATEGY FILE_COPY" >/dev/null
    [ "$(qs "SELECT count(*) FROM recommendations")" = "$SRC_ROWS" ] || die "the 17 source has $(qs "SELECT count(*) FROM recommendations") recommendation rows, not $SRC_ROWS"
    log "PostgreSQL $PG17_VERSION source loaded in $(elapsed "$t0" "$(now)") s"
    use_pair 15
}

# --- TPC-B at full speed --------------------------------------------------------------
# prepare_tpcb PAIR: database tpcb on that pair's source, pgbench -i -s TPCB_SCALE, a
# primary key on pgbench_history (every table replicated needs one), the heartbeat
# table; saved as template tpcb_tpl.
prepare_tpcb() {
    use_pair "$1" tpcb
    set_step "tpcb: pgbench -i ($1)"
    qs_admin "CREATE DATABASE tpcb" >/dev/null
    "$PGBIN/pgbench" -i -q -s "$TPCB_SCALE" -h 127.0.0.1 -p "$SP" -U postgres tpcb >"$WORK/logs/pgbench-init-tpcb-$1.log" 2>&1 \
        || die "pgbench -i on the $1 source failed: $(tail -n 3 "$WORK/logs/pgbench-init-tpcb-$1.log")"
    qs "ALTER TABLE pgbench_history ADD COLUMN hid bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY;
        CREATE TABLE public.bench_heartbeat (id int PRIMARY KEY, seq bigint NOT NULL, ts timestamptz NOT NULL);
        INSERT INTO public.bench_heartbeat VALUES (1, 0, clock_timestamp());" >/dev/null
    qs "VACUUM (FREEZE, ANALYZE)" >/dev/null
    qs_admin "CREATE DATABASE tpcb_tpl TEMPLATE tpcb STRATEGY FILE_COPY" >/dev/null
    if [ "$1" = 15 ]; then
        "$PGBIN/pg_dump" -h 127.0.0.1 -p "$SP" -U postgres -d tpcb --schema-only --no-owner --no-acl >"$WORK/tpcb-schema.sql"
    fi
    use_pair 15
}

tpcb_checksum_sql="SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ':' || (SELECT sum(bbalance) FROM pgbench_branches) || ':' || (SELECT count(*) FROM pgbench_history)"

# cpu_ticks PID...: user + system clock ticks (CLK_TCK) the processes have used; a
# process that is gone counts 0
cpu_ticks() {
    local p total=0 t
    for p in "$@"; do
        t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null) || t=0
        total=$((total + ${t:-0}))
    done
    echo "$total"
}
# cluster_ticks PORT: CPU clock ticks a cluster has used: its postmaster's own and
# its reaped children's (cutime, cstime: backends and walsenders that exited), plus
# every live child's; the difference over an interval is the cluster's CPU in it
cluster_ticks() {
    local dir pm own
    dir=$(q "$1" postgres -c "SHOW data_directory")
    pm=$(head -n 1 "$dir/postmaster.pid" 2>/dev/null)
    [ -n "$pm" ] || { echo 0; return; }
    own=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 + $14 + $15 }' "/proc/$pm/stat" 2>/dev/null) || own=0
    # shellcheck disable=SC2046
    echo $(( ${own:-0} + $(cpu_ticks $(pgrep -P "$pm")) ))
}
# ticks_s TICKS: clock ticks as seconds, two decimals
ticks_s() { awk -v d="$1" -v h="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", d / h }'; }
# drain_cpu_begin: notes both clusters' CPU when a drain starts
# (and walshuttle's process, when one runs already; one started after counts from 0)
drain_cpu_begin() {
    DRAIN_SRC0=$(cluster_ticks "$SP"); DRAIN_TGT0=$(cluster_ticks "$TP")
    DRAIN_WS0=0
    if [ -n "${WS_PID:-}" ] && [ -e "/proc/$WS_PID" ]; then DRAIN_WS0=$(cpu_ticks "$WS_PID"); fi
}
# drain_cpu_record TOOL PREFIX SECONDS: what each side spent of a drain of SECONDS:
# CPU seconds of the source cluster (the walsender decoding and sending), the target
# cluster (what executes the changes) and walshuttle's process
drain_cpu_record() {
    local tool=$1 prefix=$2 secs=$3 src tgt
    src=$(ticks_s $(( $(cluster_ticks "$SP") - DRAIN_SRC0 ))); tgt=$(ticks_s $(( $(cluster_ticks "$TP") - DRAIN_TGT0 )))
    record "${prefix}_source_cpu_s" "$tool" "$src"
    record "${prefix}_target_cpu_s" "$tool" "$tgt"
    case "$tool" in walshuttle*)
        record "${prefix}_walshuttle_cpu_s" "$tool" "$(ticks_s $(( $(cpu_ticks "$WS_PID") - DRAIN_WS0 )))" ;;
    esac
    log "$tool: drain of $secs s: source cluster $src s CPU, target cluster $tgt s"
}
# settle_slot SLOT: before a peer's replicator is stopped for a backlog, lets the
# source move SLOT's restart point past everything written so far (a CHECKPOINT logs
# the running transactions the walsender needs; walshuttle's run waits for the same
# when it stops), so the next start does not decode again what came before (the bulk
# transaction, the load) and the drain measures the backlog alone
settle_slot() {
    local slot=$1 lsn seen
    lsn=$(qs "SELECT pg_current_wal_lsn()")
    qs_admin "CHECKPOINT" >/dev/null
    source_marker >/dev/null
    seen=$(poll_until "$SP" "coalesce((SELECT restart_lsn >= '$lsn' FROM pg_replication_slots WHERE slot_name = '$slot'), false)" 60 0.2)
    [ -n "$seen" ] || note "$slot: the source did not move the slot's restart point within 60 s: its next start decodes again what came before the backlog"
}
# decode_alone_begin: copies walshuttle's (inactive) slot, so that the backlog can be
# decoded a second time after walshuttle drained it
decode_alone_begin() {
    qs "SELECT pg_copy_logical_replication_slot('walshuttle', 'bench_decode_alone')" >/dev/null
    DECODE_END=$(qs "SELECT pg_current_wal_lsn()")
}
# decode_alone TOOL PREFIX: what the source's decoding alone costs for the backlog:
# the copied slot read with walshuttle's options (pgoutput, protocol 2, binary) by
# pg_logical_slot_get_binary_changes, in a backend, with no network and no consumer.
# Not a floor of the drain: a walsender also sends each message (a send() per message
# while its reader keeps up), which costs it several times this (measured: 1.75 s of
# walsender CPU for 40,000 TPC-B transactions read by pg_recvlogical, 0.26 s here)
decode_alone() {
    local tool=$1 prefix=$2 pub t0 t1 src
    pub=$(qs "SELECT pubname FROM pg_publication ORDER BY pubname = 'walshuttle' DESC LIMIT 1")
    drain_cpu_begin
    t0=$(now)
    if qs "SELECT count(*) FROM pg_logical_slot_get_binary_changes('bench_decode_alone', '$DECODE_END', NULL, 'proto_version', '2', 'publication_names', '$pub', 'binary', 'true')" \
        >"$WORK/logs/decode-alone-$prefix-$tool.log" 2>&1; then
        t1=$(now)
        src=$(ticks_s $(( $(cluster_ticks "$SP") - DRAIN_SRC0 )))
        record "${prefix}_decode_alone_s" "$tool" "$(elapsed "$t0" "$t1")"
        log "$tool: the source decodes the backlog alone (SQL, no network) in $(elapsed "$t0" "$t1") s (source cluster $src s CPU)"
    else
        broke "$tool: decoding the backlog alone failed: $(tail -n 3 "$WORK/logs/decode-alone-$prefix-$tool.log" | tr '\n' ' ')"
    fi
    qs "SELECT pg_drop_replication_slot('bench_decode_alone')" >/dev/null || true
}
# apply_pids TOOL: what applies the stream: every process of the target cluster
# (walshuttle's backends, native's apply worker, the target's own writers), and
# walshuttle's process when TOOL is walshuttle's
apply_pids() {
    local dir pm
    dir=$(qt "SHOW data_directory")
    pm=$(head -n 1 "$dir/postmaster.pid" 2>/dev/null)
    [ -n "$pm" ] && pgrep -P "$pm"
    case "$1" in walshuttle*) echo "$WS_PID" ;; esac
}

# tpcb_load TOOL SLOT: the replicator streams database tpcb (use_pair PAIR tpcb done);
# pgbench -b tpcb-like at full speed while a heartbeat commits every 100 ms and the
# target's heartbeat age is sampled every 0.2 s; then the drain after pgbench ends
tpcb_load() {
    local tool=$1 slot=$2 hbpid pbpid smpid tps seq seen t_end s t
    local secs="$WORK/tpcb-lag-$tool.txt"
    : >"$secs"
    log "$tool: TPC-B: pgbench -b tpcb-like -c $TPCB_CLIENTS -T $TPCB_SECONDS (scale $TPCB_SCALE), lag sampled every 0.2 s"
    checkpoint_both
    q "$SP" tpcb -c "DO \$\$ DECLARE stop timestamptz := clock_timestamp() + interval '$((TPCB_SECONDS + 2)) seconds';
        BEGIN WHILE clock_timestamp() < stop LOOP
            UPDATE bench_heartbeat SET seq = seq + 1, ts = clock_timestamp() WHERE id = 1; COMMIT;
            PERFORM pg_sleep(0.1);
        END LOOP; END \$\$" >"$WORK/logs/tpcb-heartbeat-$tool.log" 2>&1 &
    hbpid=$!; track "$hbpid"
    sleep 1
    "$PGBIN/pgbench" -n -b tpcb-like -c "$TPCB_CLIENTS" -j 2 -T "$TPCB_SECONDS" -P 10 -h 127.0.0.1 -p "$SP" -U postgres tpcb \
        >"$WORK/logs/pgbench-tpcb-$tool.log" 2>&1 &
    pbpid=$!; track "$pbpid"
    # CPU of what applies, per source transaction: the target cluster's processes
    # (and walshuttle's) over the load, divided by pgbench's transactions
    local cpu_pids cpu0 cpu1 ws_cpu0 ws_cpu1 txns tck
    read -r -a cpu_pids <<<"$(apply_pids "$tool" | tr '\n' ' ')"
    cpu0=$(cpu_ticks "${cpu_pids[@]}")
    case "$tool" in walshuttle*) ws_cpu0=$(cpu_ticks "$WS_PID") ;; esac
    # one psql session samples the target's heartbeat age for the whole load
    { printf 'SELECT round(extract(epoch FROM clock_timestamp() - ts)::numeric, 3) FROM bench_heartbeat WHERE id = 1\n\\watch 0.2\n' |
        timeout "$TPCB_SECONDS" "$PSQL" -X -At -h 127.0.0.1 -p "$TP" -U postgres -d tpcb 2>>"$WORK/logs/poll.log" || true; } |
        grep -E '^-?[0-9.]+$' >"$secs" &
    smpid=$!; track "$smpid"
    wait "$pbpid" || broke "$tool: pgbench (TPC-B) failed: $(tail -n 3 "$WORK/logs/pgbench-tpcb-$tool.log")"
    t_end=$(now)
    cpu1=$(cpu_ticks "${cpu_pids[@]}")
    case "$tool" in walshuttle*) ws_cpu1=$(cpu_ticks "$WS_PID") ;; esac
    txns=$(awk '/number of transactions actually processed:/ { print $NF; exit }' "$WORK/logs/pgbench-tpcb-$tool.log" | cut -d/ -f1)
    tck=$(getconf CLK_TCK)
    if [ -n "$txns" ] && [ "$txns" -gt 0 ]; then
        record tpcb_apply_cpu_us_per_txn "$tool" "$(awk -v d=$((cpu1 - cpu0)) -v n="$txns" -v h="$tck" 'BEGIN { printf "%.1f", d * 1e6 / h / n }')"
        [ -n "${ws_cpu1:-}" ] && record tpcb_walshuttle_cpu_us_per_txn "$tool" "$(awk -v d=$((ws_cpu1 - ws_cpu0)) -v n="$txns" -v h="$tck" 'BEGIN { printf "%.1f", d * 1e6 / h / n }')"
    fi
    seq=$(source_marker)
    seen=$(wait_marker "$seq" 900)
    wait "$smpid" 2>/dev/null || true
    wait "$hbpid" 2>/dev/null || true
    [ -n "$seen" ] || { broke "$tool: TPC-B: target did not catch up within 900 s after pgbench ended"; return 1; }
    record tpcb_drain_s "$tool" "$(elapsed "$t_end" "$seen")"
    tps=$(awk '/^tps = / { print $3; exit }' "$WORK/logs/pgbench-tpcb-$tool.log")
    record tpcb_pgbench_tps "$tool" "${tps:-null}"
    record tpcb_lag_samples "$tool" "$(wc -l <"$secs")"
    if [ -s "$secs" ]; then
        record tpcb_lag_seconds_p50 "$tool" "$(percentile 0.50 "$secs")"
        record tpcb_lag_seconds_p99 "$tool" "$(percentile 0.99 "$secs")"
        record tpcb_lag_seconds_max "$tool" "$(sort -g "$secs" | tail -n 1)"
    else
        broke "$tool: TPC-B: no lag samples"
    fi
    cp "$secs" "$WORK/logs/" 2>/dev/null || true
    s=$(qs "$tpcb_checksum_sql"); t=$(qt "$tpcb_checksum_sql")
    if [ "$s" = "$t" ]; then record consistent_after_tpcb "$tool" true
    else record consistent_after_tpcb "$tool" false; broke "$tool: after TPC-B the target ($t) differs from the source ($s)"; fi
    log "$tool: TPC-B: $tps tps; lag p50 $(percentile 0.50 "$secs") s, p99 $(percentile 0.99 "$secs") s, max $(sort -g "$secs" | tail -n 1) s; drained $(elapsed "$t_end" "$seen") s after pgbench ended"
}

# tpcb_backlog_write TOOL: TPCB_BACKLOG_TXNS TPC-B transactions by TPCB_CLIENTS clients
# while the replicator is stopped; sets MARK_SEQ to the marker written after them
tpcb_backlog_write() {
    local tool=$1 per t0
    per=$(( (TPCB_BACKLOG_TXNS + TPCB_CLIENTS - 1) / TPCB_CLIENTS ))
    log "$tool: TPC-B backlog: $((per * TPCB_CLIENTS)) transactions by $TPCB_CLIENTS clients (replicator stopped)"
    t0=$(now)
    "$PGBIN/pgbench" -n -b tpcb-like -c "$TPCB_CLIENTS" -j 2 -t "$per" -h 127.0.0.1 -p "$SP" -U postgres tpcb \
        >"$WORK/logs/pgbench-tpcb-backlog-$tool.log" 2>&1 \
        || { broke "$tool: pgbench (TPC-B backlog) failed: $(tail -n 3 "$WORK/logs/pgbench-tpcb-backlog-$tool.log")"; return 1; }
    record tpcb_backlog_write_s "$tool" "$(elapsed "$t0" "$(now)")"
    MARK_SEQ=$(source_marker)
    checkpoint_both
}

# tpcb_backlog_check TOOL T0: waits for the backlog's marker, records the drain from
# T0 and whether source and target agree
tpcb_backlog_check() {
    local tool=$1 t0=$2 seen s t
    seen=$(wait_marker "$MARK_SEQ" 900)
    [ -n "$seen" ] || { broke "$tool: TPC-B backlog not drained within 900 s"; return 1; }
    record tpcb_backlog_drain_s "$tool" "$(elapsed "$t0" "$seen")"
    drain_cpu_record "$tool" tpcb_backlog "$(elapsed "$t0" "$seen")"
    log "$tool: TPC-B backlog drained in $(elapsed "$t0" "$seen") s"
    s=$(qs "$tpcb_checksum_sql"); t=$(qt "$tpcb_checksum_sql")
    if [ "$s" = "$t" ]; then record consistent_after_tpcb_backlog "$tool" true
    else record consistent_after_tpcb_backlog "$tool" false; broke "$tool: after the TPC-B backlog the target ($t) differs from the source ($s)"; fi
}

run_tpcb_walshuttle() { tpcb_walshuttle 15 walshuttle; }
run_tpcb_walshuttle17() { tpcb_walshuttle 17 walshuttle17; }
tpcb_walshuttle() {   # pair tool
    use_pair "$1" tpcb
    local tool=$2 rc=0 t0 seen prof=""
    WS_TOOL=$tool
    set_step "$tool: TPC-B bootstrap"
    free_slot walshuttle; reset_target; reset_source; checkpoint_both
    t0=$(now)
    "$WS" --source "$SRC_URL" --target "$TGT_URL" bootstrap --jobs "$JOBS" >"$WORK/logs/$tool-tpcb-bootstrap.log" 2>&1 || rc=$?
    [ "$rc" = 0 ] || { broke "$tool: TPC-B bootstrap exited $rc: $(tail -n 5 "$WORK/logs/$tool-tpcb-bootstrap.log" | tr '\n' ' ')"; return 1; }
    record tpcb_initial_copy_s "$tool" "$(elapsed "$t0" "$(now)")"
    set_step "$tool: TPC-B"
    if [ -n "$WS_PROF" ] && [ "$tool" = walshuttle ]; then
        prof="$WORK/tpcb-flamegraph.svg"
        WS_RUN_BIN=$WS_PROF
        export WALSHUTTLE_PROFILE=$prof
        log "$tool: TPC-B run with the profiling binary (sha256 $WS_PROF_SHA…), flamegraph to $prof"
    fi
    ws_start_run "$tool-run-tpcb"
    unset WALSHUTTLE_PROFILE; WS_RUN_BIN=""
    ws_wait_streaming "$tool-run-tpcb"
    seen=$(wait_marker "$(source_marker)" 120)
    [ -n "$seen" ] || { broke "$tool: not caught up before the TPC-B load"; return 1; }
    tpcb_load "$tool" walshuttle
    # the profiler's own sample tables (pprof allocates ~100 MiB and more) would pass
    # for walshuttle's memory: a profiled run's peak RSS goes under its own name
    if [ -n "$prof" ]; then ws_stop tpcb_profiled "$tool-run-tpcb"; else ws_stop tpcb "$tool-run-tpcb"; fi
    if [ "$TPCB_BACKLOG_TXNS" -gt 0 ]; then
        set_step "$tool: TPC-B backlog"
        tpcb_backlog_write "$tool" || return 1
        decode_alone_begin
        drain_cpu_begin
        t0=$(now)
        ws_start_run "$tool-run-tpcb-backlog"
        tpcb_backlog_check "$tool" "$t0" || return 1
        ws_stop tpcb_backlog "$tool-run-tpcb-backlog"
        decode_alone "$tool" tpcb_backlog
    fi
    if [ -n "$prof" ]; then
        if [ -s "$prof" ]; then
            mkdir -p "$RESULTS" "$LOGDIR"
            cp "$prof" "$RESULTS/tpcb-flamegraph.svg"; cp "$prof" "$LOGDIR/tpcb-flamegraph.svg"
            note "walshuttle's TPC-B figures are of the profiling binary (sampling at 99 Hz); its peak RSS, which includes pprof's sample tables, is under Other figures as peak_rss_mib_tpcb_profiled; flamegraph: bench/results/tpcb-flamegraph.svg"
        else
            broke "$tool: the profiling binary wrote no flamegraph: $(grep -i profil "$WORK/logs/$tool-run-tpcb.log" | tail -n 3 | tr '\n' ' ')"
        fi
    fi
    drop_source_replication
}

run_tpcb_native() { tpcb_native 15 native "streaming = $NATIVE_STREAMING"; }
run_tpcb_native17() { tpcb_native 17 native17 "binary = true, streaming = parallel"; }
tpcb_native() {   # pair tool subscription-options
    use_pair "$1" tpcb
    local tool=$2 subopts=$3 t0 seen
    set_step "$tool: TPC-B subscription"
    reset_target; reset_source
    q "$TP" tpcb -f "$WORK/tpcb-schema.sql" >/dev/null 2>"$WORK/logs/$tool-tpcb-schema.log"
    qs "CREATE PUBLICATION bench_pub FOR ALL TABLES" >/dev/null
    checkpoint_both
    t0=$(now)
    qt "CREATE SUBSCRIPTION tpcb_sub CONNECTION '$SRC_CONNINFO' PUBLICATION bench_pub WITH (copy_data = true, $subopts)" >/dev/null 2>>"$WORK/logs/$tool-tpcb-schema.log"
    seen=$(poll_until "$TP" "(SELECT count(*) FILTER (WHERE srsubstate = 'r') = 5 AND count(*) = 5 FROM pg_subscription_rel)" 1800 0.05)
    [ -n "$seen" ] || { broke "$tool: TPC-B subscription not ready within 1800 s"; return 1; }
    record tpcb_initial_copy_s "$tool" "$(elapsed "$t0" "$seen")"
    seen=$(poll_until "$SP" "EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'tpcb_sub' AND active)" 120 0.1)
    [ -n "$seen" ] || { broke "$tool: TPC-B apply worker not streaming"; return 1; }
    seen=$(wait_marker "$(source_marker)" 120)
    [ -n "$seen" ] || { broke "$tool: not caught up before the TPC-B load"; return 1; }
    set_step "$tool: TPC-B"
    tpcb_load "$tool" tpcb_sub
    if [ "$TPCB_BACKLOG_TXNS" -gt 0 ]; then
        set_step "$tool: TPC-B backlog"
        settle_slot tpcb_sub
        qt "ALTER SUBSCRIPTION tpcb_sub DISABLE" >/dev/null
        seen=$(poll_until "$SP" "NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'tpcb_sub' AND active)" 120 0.1)
        [ -n "$seen" ] || { broke "$tool: TPC-B apply worker did not stop after DISABLE"; return 1; }
        tpcb_backlog_write "$tool" || return 1
        drain_cpu_begin
        t0=$(now)
        qt "ALTER SUBSCRIPTION tpcb_sub ENABLE" >/dev/null
        tpcb_backlog_check "$tool" "$t0" || return 1
    fi
    reset_target
}

# --- many tables ------------------------------------------------------------------------
# prepare_many: on the 15 source, database many (MANY_COUNT tables of MANY_ROWS rows,
# each with a primary key) and database mixed (MIXED_COUNT tables from 10 to MIXED_MAX
# rows in a geometric progression, a primary key and one secondary index each)
prepare_many() {
    use_pair 15
    set_step "many tables: schema"
    local t0; t0=$(now)
    qs_admin "CREATE DATABASE many" >/dev/null
    qs_admin "CREATE DATABASE mixed" >/dev/null
    q "$SP" many -c "DO \$\$ BEGIN FOR i IN 1..$MANY_COUNT LOOP
            EXECUTE format('CREATE TABLE public.t%s (id int PRIMARY KEY, v int NOT NULL, note text NOT NULL, ts timestamptz NOT NULL DEFAULT now())', lpad(i::text, 5, '0'));
            EXECUTE format('INSERT INTO public.t%s (id, v, note) SELECT g, g * 7 %% 1000, md5(g::text) FROM generate_series(1, $MANY_ROWS) g', lpad(i::text, 5, '0'));
            IF i % 100 = 0 THEN COMMIT; END IF;
        END LOOP; END \$\$" >/dev/null
    q "$SP" mixed -c "DO \$\$ DECLARE n bigint; BEGIN FOR i IN 0..$((MIXED_COUNT - 1)) LOOP
            n := round(10 * power($MIXED_MAX / 10.0, i / $((MIXED_COUNT - 1)).0));
            EXECUTE format('CREATE TABLE public.m%s (id bigint PRIMARY KEY, v int NOT NULL, note text NOT NULL, ts timestamptz NOT NULL)', lpad(i::text, 3, '0'));
            EXECUTE format('INSERT INTO public.m%s SELECT g, (g * 7919) %% 100000, md5(g::text) || md5((g + 1)::text), now() - g * interval ''1 s'' FROM generate_series(1, %s) g', lpad(i::text, 3, '0'), n);
            EXECUTE format('CREATE INDEX ON public.m%s (v)', lpad(i::text, 3, '0'));
            COMMIT;
        END LOOP; END \$\$" >/dev/null
    q "$SP" many -c "VACUUM (FREEZE, ANALYZE)" >/dev/null
    q "$SP" mixed -c "VACUUM (FREEZE, ANALYZE)" >/dev/null
    MIXED_ROWS=$(q "$SP" mixed -c "SELECT sum(n_live_tup) FROM pg_stat_user_tables")
    echo "$MIXED_ROWS" >"$WORK/mixed_rows"
    log "many tables: $MANY_COUNT tables x $MANY_ROWS rows ($(q "$SP" many -c "SELECT pg_size_pretty(pg_database_size('many'))")), $MIXED_COUNT mixed tables, $MIXED_ROWS rows ($(q "$SP" mixed -c "SELECT pg_size_pretty(pg_database_size('mixed'))")); made in $(elapsed "$t0" "$(now)") s"
}

# row counts of every table in DB equal on both sides (one query a side)
counts_sql="SELECT string_agg(relname || '=' || n, ',' ORDER BY relname) FROM (SELECT c.relname, (xpath('/row/n/text()', query_to_xml(format('SELECT count(*) AS n FROM %I.%I', 'public', c.relname), false, true, '')))[1]::text AS n FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r') s"
many_check() {   # tool key
    local s t
    s=$(qs "$counts_sql"); t=$(qt "$counts_sql")
    if [ "$s" = "$t" ]; then record "${2}_consistent" "$1" true
    else record "${2}_consistent" "$1" false; broke "$1: $2: the target's tables or row counts differ from the source's"; return 1; fi
}

run_many_walshuttle() { many_walshuttle many; many_walshuttle mixed; }
many_walshuttle() {   # db
    use_pair 15 "$1"
    local key=$1 t0 t1 rc=0 wd seen
    WS_TOOL=walshuttle
    set_step "walshuttle: $key bootstrap"
    free_slot walshuttle; reset_target; drop_source_replication
    copy_clock_start "walshuttle_$key"
    t0=$(now)
    "$WS" --source "$SRC_URL" --target "$TGT_URL" bootstrap --jobs "$JOBS" >"$WORK/logs/walshuttle-$key-bootstrap.log" 2>&1 &
    local pid=$!; track "$pid"
    watchdog "$pid" "$MANY_TIMEOUT" "$WORK/hwm-$key" & wd=$!; track "$wd"
    wait "$pid" || rc=$?
    t1=$(now)
    wait "$wd" 2>/dev/null || true
    [ -f "$WORK/hwm-$key" ] && record "peak_rss_mib_${key}_bootstrap" walshuttle "$(kib_to_mib "$(cat "$WORK/hwm-$key")")"
    [ -f "$WORK/hwm-$key.timeout" ] && { broke "walshuttle: $key bootstrap did not finish within $MANY_TIMEOUT s (killed)"; return 1; }
    [ "$rc" = 0 ] || { broke "walshuttle: $key bootstrap exited $rc: $(tail -n 5 "$WORK/logs/walshuttle-$key-bootstrap.log" | tr '\n' ' ')"; return 1; }
    record "${key}_bootstrap_s" walshuttle "$(elapsed "$t0" "$t1")"
    log "walshuttle: $key bootstrap $(elapsed "$t0" "$t1") s"
    many_check walshuttle "$key"
    set_step "walshuttle: $key run start-up"
    t0=$(now)
    ws_start_run "walshuttle-$key-run"
    seen=$(poll_until "$SP" "EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'walshuttle' AND active)" 300 0.02)
    [ -n "$seen" ] || { broke "walshuttle: $key: run did not start streaming within 300 s"; return 1; }
    record "${key}_run_startup_s" walshuttle "$(elapsed "$t0" "$seen")"
    log "walshuttle: $key run streaming $(elapsed "$t0" "$seen") s after the process started"
    sleep 1
    ws_stop "${key}_run" "walshuttle-$key-run"
    drop_source_replication
}

run_many_pgcopydb() {
    command -v pgcopydb >/dev/null 2>&1 || { note "SKIP pgcopydb many tables: not installed"; return 0; }
    many_pgcopydb many; many_pgcopydb mixed
}
many_pgcopydb() {   # db
    use_pair 15 "$1"
    local key=$1 t0 t1 rc=0 dir="$WORK/pgcopydb-$1"
    set_step "pgcopydb: $key clone"
    reset_target; rm -rf "$dir"
    copy_clock_start "pgcopydb_$key"
    t0=$(now)
    timeout "$MANY_TIMEOUT" pgcopydb clone --source "$SRC_URL" --target "$TGT_URL" --dir "$dir" \
        --table-jobs "$JOBS" --index-jobs "$JOBS" --no-owner --no-acl --no-comments --skip-extensions \
        >"$WORK/logs/pgcopydb-$key.log" 2>&1 || rc=$?
    t1=$(now)
    [ "$rc" = 0 ] || { broke "pgcopydb: $key clone exited $rc: $(grep -E 'ERROR|FATAL' "$WORK/logs/pgcopydb-$key.log" | tail -n 3 | tr '\n' ' ')"; return 0; }
    record "${key}_bootstrap_s" pgcopydb "$(elapsed "$t0" "$t1")"
    log "pgcopydb: $key clone $(elapsed "$t0" "$t1") s"
    many_check pgcopydb "$key"
    rm -rf "$dir"
}

run_many_native() { many_native many; many_native mixed; }
many_native() {   # db
    use_pair 15 "$1"
    local key=$1 t0 seen n ready
    set_step "native: $key subscription"
    reset_target; drop_source_replication
    n=$(qs "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
    "$PGBIN/pg_dump" -h 127.0.0.1 -p "$SP" -U postgres -d "$key" --schema-only --no-owner --no-acl >"$WORK/$key-schema.sql"
    q "$TP" "$key" -f "$WORK/$key-schema.sql" >/dev/null 2>"$WORK/logs/native-$key-schema.log"
    qs "CREATE PUBLICATION bench_pub FOR ALL TABLES" >/dev/null
    copy_clock_start "native_$key"
    t0=$(now)
    qt "CREATE SUBSCRIPTION ${key}_sub CONNECTION '$SRC_CONNINFO' PUBLICATION bench_pub WITH (copy_data = true, streaming = $NATIVE_STREAMING)" >/dev/null 2>>"$WORK/logs/native-$key-schema.log"
    seen=$(poll_until "$TP" "(SELECT count(*) FILTER (WHERE srsubstate = 'r') = $n AND count(*) = $n FROM pg_subscription_rel)" "$MANY_TIMEOUT" 0.2)
    if [ -z "$seen" ]; then
        ready=$(qt "SELECT count(*) FILTER (WHERE srsubstate = 'r') FROM pg_subscription_rel")
        record "${key}_tables_ready_at_timeout" native "$ready"
        note "native: $key: only $ready of $n tables ready after $MANY_TIMEOUT s (--many-timeout); no time recorded"
        reset_target
        return 0
    fi
    record "${key}_bootstrap_s" native "$(elapsed "$t0" "$seen")"
    log "native: $key all $n tables ready $(elapsed "$t0" "$seen") s after CREATE SUBSCRIPTION"
    many_check native "$key"
    reset_target
}

# run each part in a subshell so that one failing does not stop the others;
# set -e holds inside it (it is not run as a condition)
part() {
    local rc=0 load
    load=$(cut -d' ' -f1 /proc/loadavg)
    record load_avg_1m_at_start "$1" "$load"
    set +e
    ( set -e; "$@" )
    rc=$?
    set -e
    if [ "$rc" != 0 ]; then
        [ -f "$FAILED" ] || broke "$1 failed at step '$(cat "$WORK/step" 2>/dev/null)' (exit $rc)"
        log "$1 stopped early (exit $rc); continuing with the next part"
    fi
}

if awk -v l="$LOAD_START" 'BEGIN { exit !(l > 0.5) }'; then
    note "the machine was not idle when the benchmark started (1-minute load average $LOAD_START): other work skews the figures"
fi
T_ALL0=$(now)
if [ "$ONLY" != tpcb ]; then
    part run_pgcopydb
    part run_psql_pipe
    [ "$FLOOR" = 1 ] && part run_floor
    part run_walshuttle
    part run_native
fi
PG17_VERSION=""
if [ "$PG17" = 1 ]; then
    setup_pg17
    if [ "$ONLY" != tpcb ]; then
        part run_walshuttle17
        part run_native17
    fi
fi
if [ "$TPCB" = 1 ]; then
    log "TPC-B: preparing database tpcb (pgbench -i -s $TPCB_SCALE)"
    prepare_tpcb 15
    [ "$PG17" = 1 ] && prepare_tpcb 17
    part run_tpcb_walshuttle
    part run_tpcb_native
    if [ "$PG17" = 1 ]; then
        part run_tpcb_walshuttle17
        part run_tpcb_native17
    fi
fi
MIXED_ROWS=""
if [ "$MANY" = 1 ]; then
    prepare_many
    part run_many_walshuttle
    part run_many_pgcopydb
    part run_many_native
fi
T_ALL1=$(now)
log "all measurements done in $(elapsed "$T_ALL0" "$T_ALL1") s"

# ================================================================ report =====
mkdir -p "$RESULTS"
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
NPROC=$(nproc)
RAM_GIB=$(awk '/^MemTotal:/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
CPU_MODEL=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
WS_VERSION=$("$WS" --version 2>/dev/null | awk '{ print $2 }')
GIT_REV=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
GIT_DIRTY=$(cd "$REPO" && { git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | grep -q . && echo true || echo false; })
PGCOPYDB_VERSION=$(pgcopydb --version 2>&1 | awk '/^pgcopydb version/ { print $3; exit }' || true)

# metric <key> -> value for a tool, or empty
val() { awk -F'\t' -v k="$1" -v t="$2" '$1 == k && $2 == t { v = $3 } END { if (v != "") print v }' "$METRICS"; }
ratio() { [ -n "$1" ] && [ -n "$2" ] && awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0) print ""; else printf "%.2f", a / b }'; }

# key | label | unit
ROWDEFS=(
    "initial_copy_s|Initial copy, incl. keys + indexes|s"
    "bulk_apply_from_commit_s|Bulk apply ${BULK_ROWS} rows, from COMMIT|s"
    "bulk_apply_from_start_s|Bulk apply ${BULK_ROWS} rows, from BEGIN|s"
    "backlog_drain_s|Backlog drain, ${BACKLOG_TXNS} txns|s"
    "idle_txn_latency_p50_s|Single-row txn on idle source, p50 of 10|s"
    "idle_txn_latency_max_s|Single-row txn on idle source, max of 10|s"
    "steady_lag_seconds_p50|Steady lag p50 (heartbeat)|s"
    "steady_lag_seconds_p99|Steady lag p99 (heartbeat)|s"
    "steady_lag_bytes_p50|Steady lag p50 (slot)|bytes"
    "steady_lag_bytes_p99|Steady lag p99 (slot)|bytes"
    "peak_rss_mib_bootstrap|walshuttle peak RSS: bootstrap|MiB"
    "peak_rss_mib_bulk_apply|walshuttle peak RSS: run, bulk apply|MiB"
    "peak_rss_mib_backlog_drain|walshuttle peak RSS: run, backlog drain|MiB"
    "peak_rss_mib_steady_state|walshuttle peak RSS: run, steady state|MiB"
)
if [ "$TPCB" = 1 ]; then
    ROWDEFS+=(
        "tpcb_lag_seconds_p50|TPC-B lag p50 (heartbeat, every 0.2 s)|s"
        "tpcb_lag_seconds_p99|TPC-B lag p99 (heartbeat, every 0.2 s)|s"
        "tpcb_drain_s|TPC-B drain after end|s"
        "tpcb_apply_cpu_us_per_txn|TPC-B apply CPU per source txn (target cluster + replicator)|µs"
        "tpcb_backlog_drain_s|TPC-B backlog drain, ${TPCB_BACKLOG_TXNS} txns by ${TPCB_CLIENTS} clients|s"
        "peak_rss_mib_tpcb|walshuttle peak RSS: run, TPC-B|MiB"
    )
fi
if [ "$MANY" = 1 ]; then
    ROWDEFS+=(
        "many_bootstrap_s|Bootstrap, ${MANY_COUNT} tables x ${MANY_ROWS} rows|s"
        "mixed_bootstrap_s|Bootstrap, ${MIXED_COUNT} tables of 10..${MIXED_MAX} rows|s"
        "many_run_startup_s|run start-up to streaming, ${MANY_COUNT} tables|s"
        "mixed_run_startup_s|run start-up to streaming, ${MIXED_COUNT} tables|s"
        "peak_rss_mib_many_bootstrap|walshuttle peak RSS: bootstrap, ${MANY_COUNT} tables|MiB"
        "peak_rss_mib_mixed_bootstrap|walshuttle peak RSS: bootstrap, ${MIXED_COUNT} tables|MiB"
    )
fi
# the value columns (tool names as recorded), then the ratio columns (a:b = a / b;
# best = the lowest of pgcopydb, native and the psql pipe)
PEERS=(pgcopydb native psql_pipe)
VCOLS=(walshuttle pgcopydb native psql_pipe)
RCOLS=(walshuttle:pgcopydb walshuttle:native walshuttle:psql_pipe walshuttle:best)
if [ "$FLOOR" = 1 ]; then VCOLS+=(floor); RCOLS+=(walshuttle:floor); fi
if [ "$PG17" = 1 ]; then VCOLS+=(walshuttle17 native17); RCOLS+=(walshuttle17:native17); fi
col_label() {
    case "$1" in
        psql_pipe) echo "psql pipe" ;;
        walshuttle17) echo "ws (PG 17)" ;;
        native17) echo "native 17" ;;
        walshuttle:pgcopydb) echo "ws/pgcopydb" ;;
        walshuttle:native) echo "ws/native" ;;
        walshuttle:psql_pipe) echo "ws/psql pipe" ;;
        walshuttle:best) echo "ws/best peer" ;;
        walshuttle:floor) echo "ws/floor" ;;
        walshuttle17:native17) echo "ws(17)/native 17" ;;
        *) echo "$1" ;;
    esac
}
# value of a ratio column for a key
rval() {   # key a:b
    local a=${2%%:*} b=${2#*:} bv
    if [ "$b" = best ]; then
        bv=$(for p in "${PEERS[@]}"; do val "$1" "$p"; done | sort -g | head -n 1)
    else
        bv=$(val "$1" "$b")
    fi
    ratio "$(val "$1" "$a")" "$bv"
}
OTHER_KEYS=(bulk_source_txn_s bulk_after_commit_source_cpu_s bulk_after_commit_target_cpu_s bulk_after_commit_walshuttle_cpu_s backlog_write_s backlog_wal_bytes backlog_decode_alone_s backlog_source_cpu_s backlog_target_cpu_s backlog_walshuttle_cpu_s steady_pgbench_tps steady_lag_seconds_max steady_lag_bytes_max steady_final_catchup_s sigterm_exit_s_bulk_apply sigterm_exit_s_backlog_drain sigterm_exit_s_steady_state consistent_after_backlog_drain consistent_after_steady_state initial_copy_target_indexes)
[ "$TPCB" = 1 ] && OTHER_KEYS+=(tpcb_pgbench_tps tpcb_walshuttle_cpu_us_per_txn tpcb_lag_seconds_max tpcb_lag_samples tpcb_initial_copy_s sigterm_exit_s_tpcb sigterm_exit_s_tpcb_profiled peak_rss_mib_tpcb_profiled consistent_after_tpcb tpcb_backlog_write_s tpcb_backlog_decode_alone_s tpcb_backlog_source_cpu_s tpcb_backlog_target_cpu_s tpcb_backlog_walshuttle_cpu_s consistent_after_tpcb_backlog sigterm_exit_s_tpcb_backlog peak_rss_mib_tpcb_backlog)
[ "$MANY" = 1 ] && OTHER_KEYS+=(many_consistent mixed_consistent many_tables_ready_at_timeout mixed_tables_ready_at_timeout peak_rss_mib_many_run peak_rss_mib_mixed_run)
if [ "$ONLY" = copy ]; then
    ROWDEFS=("${ROWDEFS[0]}" "peak_rss_mib_bootstrap|walshuttle peak RSS: bootstrap|MiB")
    OTHER_KEYS=(initial_copy_target_indexes)
fi
if [ "$ONLY" = tpcb ]; then
    KEEP_ROWS=()
    for r in "${ROWDEFS[@]}"; do case "$r" in tpcb_*|peak_rss_mib_tpcb*) KEEP_ROWS+=("$r") ;; esac; done
    ROWDEFS=("${KEEP_ROWS[@]}")
    OTHER_KEYS=(tpcb_pgbench_tps tpcb_walshuttle_cpu_us_per_txn tpcb_lag_seconds_max tpcb_lag_samples tpcb_initial_copy_s consistent_after_tpcb tpcb_backlog_write_s tpcb_backlog_decode_alone_s tpcb_backlog_source_cpu_s tpcb_backlog_target_cpu_s tpcb_backlog_walshuttle_cpu_s consistent_after_tpcb_backlog)
fi
# the Other figures' columns: the streaming tools
OCOLS=(walshuttle native)
[ "$PG17" = 1 ] && OCOLS+=(walshuttle17 native17)
[ "$MANY" = 1 ] && OCOLS+=(pgcopydb)

fmt() { [ -n "$1" ] && echo "$1" || echo "—"; }

# ---- terminal table + markdown ----
MD="$RESULTS/$OUT.md"
{
    echo "# walshuttle vs peers$([ "$ONLY" = copy ] && echo ", initial copy only") — $DATE"
    echo
    echo "- machine: $NPROC CPUs ($CPU_MODEL), $RAM_GIB GiB RAM"
    echo "- PostgreSQL $PG_VERSION (source and target clusters on this machine, fsync $([ "$FAST" = 1 ] && echo off || echo on))"
    [ "$PG17" = 1 ] && echo "- --pg17: a second pair of clusters, PostgreSQL ${PG17_VERSION:-?} ($PG17_HOME), same settings and data: columns *ws (PG 17)* and *native 17* (subscription WITH (binary = true, streaming = parallel))"
    [ "$FLOOR" = 1 ] && echo "- floor: the target alone, $JOBS sessions each loading one local binary COPY TO file per table, then the same keys and indexes in $JOBS sessions"
    [ "$TPCB" = 1 ] && echo "- TPC-B: pgbench -b tpcb-like, scale $TPCB_SCALE (own database tpcb, pgbench_history given a primary key), $TPCB_CLIENTS clients, $TPCB_SECONDS s, full speed; native 15 with streaming = $NATIVE_STREAMING"
    [ -n "$WS_PROF_SHA" ] && echo "- --profile: walshuttle's TPC-B run used a binary built with --features profiling (sha256 $WS_PROF_SHA…, sampling at 99 Hz): bench/results/tpcb-flamegraph.svg"
    [ "$MANY" = 1 ] && echo "- many tables (PostgreSQL 15 pair): $MANY_COUNT tables x $MANY_ROWS rows (int key, 4 columns); $MIXED_COUNT tables of 10..$MIXED_MAX rows (${MIXED_ROWS:-?} rows in all, a key and one index each); max_locks_per_transaction = 256 on every cluster"
    echo "- walshuttle $WS_VERSION: binary sha256 $WS_SHA… built $WS_BUILT${WALSHUTTLE_BIN_REV:+ from $WALSHUTTLE_BIN_REV}; repository HEAD $GIT_REV$([ "$GIT_DIRTY" = true ] && echo " with uncommitted changes in src (the binary may predate them)")"
    echo "- pgcopydb ${PGCOPYDB_VERSION:-not installed}"
    echo "- data: scale $SCALE = $SRC_ROWS recommendation rows, source database $DB_PRETTY; --jobs $JOBS"
    [ -n "${WALSHUTTLE_RUN_ARGS:-}" ] && echo "- extra \`walshuttle run\` flags: ${WALSHUTTLE_RUN_ARGS}"
    echo "- total measurement time $(elapsed "$T_ALL0" "$T_ALL1") s; 1-minute load average before the run $LOAD_START, at the start of each part: $(awk -F'\t' '$1 == "load_avg_1m_at_start" { printf "%s%s %s", sep, $2, $3; sep = ", " }' "$METRICS")"
    echo "- 1-minute load average when each initial copy's clock started → stopped: $(for t in "${VCOLS[@]}"; do a=$(val initial_copy_load_start "$t"); b=$(val initial_copy_load_end "$t"); [ -n "$a" ] && printf '%s%s %s → %s' "${sep-}" "$t" "$a" "${b:-?}" && sep=", "; done; unset sep)$([ -n "$WAIT_LOAD" ] && echo "; each waited for a load below $WAIT_LOAD (at most $WAIT_MAX s)")"
    echo
    echo "Times and lag: lower is better; a ratio is walshuttle / peer (below 1 = walshuttle better)."
    echo
    line="| measurement | unit"; sepl="|---|---"
    for c in "${VCOLS[@]}" "${RCOLS[@]}"; do line="$line | $(col_label "$c")"; sepl="$sepl|---:"; done
    echo "$line |"; echo "$sepl|"
    for def in "${ROWDEFS[@]}"; do
        IFS='|' read -r key label unit <<<"$def"
        line="| $label | $unit"
        for c in "${VCOLS[@]}"; do line="$line | $(fmt "$(val "$key" "$c")")"; done
        for c in "${RCOLS[@]}"; do line="$line | $(fmt "$(rval "$key" "$c")")"; done
        echo "$line |"
    done
    echo
    echo "Other figures:"
    echo
    line="| figure"; sepl="|---"
    for c in "${OCOLS[@]}"; do line="$line | $(col_label "$c")"; sepl="$sepl|---:"; done
    echo "$line |"; echo "$sepl|"
    for key in "${OTHER_KEYS[@]}"; do
        line="| $key"; any=""
        for c in "${OCOLS[@]}"; do v=$(val "$key" "$c"); [ -n "$v" ] && any=1; line="$line | $(fmt "$v")"; done
        [ -n "$any" ] && echo "$line |"
    done
    pd=$(val initial_copy_data_only_s psql_pipe); pi=$(val initial_copy_index_build_s psql_pipe)
    [ -n "$pd" ] && echo && echo "psql pipe breakdown: data $pd s + keys/indexes $pi s."
    pd=$(val initial_copy_data_only_s floor); pi=$(val initial_copy_index_build_s floor)
    [ -n "$pd" ] && echo && echo "floor breakdown: data $pd s + keys/indexes $pi s ($(val floor_file_bytes floor) bytes of COPY files)."
    for c in native native17; do
        ar=$(val peak_rss_mib_steady_state "${c}_apply_worker")
        [ -n "$ar" ] && echo && echo "$(col_label "$c") apply worker (a backend process) peak RSS after steady state: $ar MiB (includes shared memory it touched)."
    done
    if [ -s "$NOTES" ]; then
        echo
        echo "Notes:"
        echo
        sed 's/^/- /' "$NOTES"
    fi
} >"$MD"

# ---- JSON ----
JSON="$RESULTS/$OUT.json"
json_num() { if [ -z "$1" ]; then echo null; elif [[ $1 =~ ^(true|false)$ ]]; then echo "$1"; else echo "$1"; fi; }
json_str() { printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' | tr -d '\000-\037')"; }
{
    echo "{"
    echo "  \"date\": $(json_str "$DATE"),"
    echo "  \"machine\": {\"nproc\": $NPROC, \"ram_gib\": $RAM_GIB, \"cpu\": $(json_str "$CPU_MODEL")},"
    echo "  \"postgresql\": $(json_str "$PG_VERSION"),"
    echo "  \"postgresql17\": $(json_str "${PG17_VERSION:-}"),"
    echo "  \"profiling_binary_sha256_prefix\": $(json_str "$WS_PROF_SHA"),"
    echo "  \"walshuttle\": {\"version\": $(json_str "$WS_VERSION"), \"binary_sha256_prefix\": $(json_str "$WS_SHA"), \"binary_built\": $(json_str "$WS_BUILT"), \"binary_rev\": $(json_str "${WALSHUTTLE_BIN_REV:-}"), \"repo_head\": $(json_str "$GIT_REV"), \"src_dirty\": $GIT_DIRTY},"
    echo "  \"pgcopydb\": $(json_str "${PGCOPYDB_VERSION:-}"),"
    echo "  \"params\": {\"scale\": $SCALE, \"jobs\": $JOBS, \"fsync\": $([ "$FAST" = 1 ] && echo false || echo true), \"rows\": $SRC_ROWS, \"load_avg_1m_before\": $LOAD_START, \"source_db_bytes\": $DB_BYTES, \"bulk_rows\": $BULK_ROWS, \"backlog_txns\": $BACKLOG_TXNS, \"steady_rate\": $STEADY_RATE, \"steady_seconds\": $STEADY_SECONDS, \"pgcopydb_split\": $(json_str "$SPLIT_THRESHOLD"), \"native_streaming\": $(json_str "$NATIVE_STREAMING"), \"walshuttle_run_args\": $(json_str "${WALSHUTTLE_RUN_ARGS:-}"), \"only\": $(json_str "$ONLY"), \"out\": $(json_str "$OUT"), \"wait_load\": $([ -n "$WAIT_LOAD" ] && echo "$WAIT_LOAD" || echo null), \"floor\": $([ "$FLOOR" = 1 ] && echo true || echo false), \"pg17\": $([ "$PG17" = 1 ] && echo true || echo false), \"tpcb\": $([ "$TPCB" = 1 ] && echo "{\"seconds\": $TPCB_SECONDS, \"clients\": $TPCB_CLIENTS, \"scale\": $TPCB_SCALE}" || echo null), \"many_tables\": $([ "$MANY" = 1 ] && echo "{\"count\": $MANY_COUNT, \"rows\": $MANY_ROWS, \"mixed_count\": $MIXED_COUNT, \"mixed_max\": $MIXED_MAX, \"mixed_rows\": ${MIXED_ROWS:-null}}" || echo null)},"
    echo "  \"ratio_definition\": \"walshuttle / peer (walshuttle17 / native17 on the PostgreSQL 17 pair; best_peer: the lowest of pgcopydb, native, psql_pipe); lower is better for every measurement\","
    echo "  \"measurements\": ["
    n=${#ROWDEFS[@]}; i=0
    for def in "${ROWDEFS[@]}"; do
        i=$((i + 1))
        IFS='|' read -r key label unit <<<"$def"
        printf '    {"name": %s, "label": %s, "unit": %s' "$(json_str "$key")" "$(json_str "$label")" "$(json_str "$unit")"
        for c in "${VCOLS[@]}"; do printf ', "%s": %s' "$c" "$(json_num "$(val "$key" "$c")")"; done
        printf ', "ratios": {'
        sep=""
        for c in "${RCOLS[@]}"; do
            case "$c" in walshuttle:best) rk=best_peer ;; walshuttle:*) rk=${c#walshuttle:} ;; *) rk=${c/:/\/} ;; esac
            printf '%s"%s": %s' "$sep" "$rk" "$(json_num "$(rval "$key" "$c")")"; sep=", "
        done
        printf '}}'
        [ "$i" -lt "$n" ] && printf ','
        printf '\n'
    done
    echo "  ],"
    echo "  \"all_figures\": ["
    awk -F'\t' 'NR > 1 { printf ",\n" } { v = $3; if (v !~ /^-?[0-9.]+(e[-+]?[0-9]+)?$/ && v != "true" && v != "false" && v != "null") v = "\"" v "\""; printf "    {\"name\": \"%s\", \"tool\": \"%s\", \"value\": %s}", $1, $2, v } END { printf "\n" }' "$METRICS"
    echo "  ],"
    echo "  \"samples\": {"
    sep=""
    for tool in "${OCOLS[@]}"; do
        printf '%s    "%s": {' "$sep" "$tool"; sep=$',\n'
        isep=""
        for kind in lag-seconds lag-bytes idle-latency tpcb-lag; do
            f="$WORK/$kind-$tool.txt"
            printf '%s"%s": [%s]' "$isep" "${kind//-/_}" "$( [ -f "$f" ] && grep -E '^-?[0-9.]+$' "$f" | paste -sd, - )"
            isep=", "
        done
        printf '}'
    done
    printf '\n  },\n'
    echo "  \"notes\": ["
    awk 'NR > 1 { printf ",\n" } { gsub(/\\/, "\\\\"); gsub(/"/, "\\\""); gsub(/\t/, " "); printf "    \"%s\"", $0 } END { printf "\n" }' "$NOTES"
    echo "  ],"
    echo "  \"failed\": $([ -f "$FAILED" ] && echo true || echo false)"
    echo "}"
} >"$JSON"
if command -v jq >/dev/null 2>&1; then jq empty "$JSON" || log "warning: $JSON is not valid JSON"; fi

# ---- terminal ----
echo
printf '%-44s' "measurement"
for c in "${VCOLS[@]}"; do printf ' %11s' "$(col_label "$c" | cut -c1-11)"; done
for c in "${RCOLS[@]}"; do printf ' %11s' "$(col_label "$c" | cut -c1-11)"; done
printf '\n'
for def in "${ROWDEFS[@]}"; do
    IFS='|' read -r key label unit <<<"$def"
    printf '%-44s' "$(printf '%s (%s)' "$label" "$unit" | cut -c1-44)"
    for c in "${VCOLS[@]}"; do printf ' %11s' "$(fmt "$(val "$key" "$c")")"; done
    for c in "${RCOLS[@]}"; do printf ' %11s' "$(fmt "$(rval "$key" "$c")")"; done
    printf '\n'
done
echo
if [ -s "$NOTES" ]; then echo "notes:"; sed 's/^/  - /' "$NOTES"; echo; fi
echo "results: $JSON, $MD, $LOGDIR/"

if [ -f "$FAILED" ]; then
    log "something broke (see notes above); exiting 1"
    exit 1
fi
exit 0
}
