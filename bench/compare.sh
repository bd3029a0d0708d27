#!/usr/bin/env bash
# walshuttle vs its peers (pgcopydb, native logical replication, a psql \copy pipe),
# side by side, in one run, on two throwaway local PostgreSQL clusters.
# See bench/README.md for what is measured and how.
#
#   bench/compare.sh [--scale N] [--jobs J] [--fast] [--port P] [--build] [--keep]
#                    [--only copy] [--out NAME] [--wait-load L]
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
  --out NAME            write bench/results/NAME.json and NAME.md, logs to
                        bench/results/logs/NAME/ (default latest: latest.json,
                        latest.md, logs/)
  --wait-load L         before each timed initial copy, wait until the 1-minute load
                        average is below L (polled every 30 s; default: do not wait)
  --wait-max S          give up waiting after S seconds and measure anyway, with a
                        note (default 1200)
  -h, --help            this text

Environment: WALSHUTTLE_BIN (default target/release/walshuttle), WALSHUTTLE_BIN_REV
(what the binary was built from, e.g. a commit, recorded in the results), WALSHUTTLE_RUN_ARGS
(extra flags for `walshuttle run`, e.g. "--status-interval 0.2"), PGBIN (default
/usr/lib/postgresql/15/bin, else `pg_config --bindir`).
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
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for v in SCALE JOBS BASE_PORT BULK_ROWS BACKLOG_TXNS STEADY_RATE STEADY_SECONDS WAIT_MAX; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || [ "${!v}" -lt 1 ]; then
        echo "compare.sh: ${v,,} must be a positive integer" >&2; exit 2
    fi
done
case "$NATIVE_STREAMING" in on|off) ;; *) echo "compare.sh: --native-streaming on|off" >&2; exit 2 ;; esac
case "$ONLY" in all|copy) ;; *) echo "compare.sh: --only copy (or all, the default)" >&2; exit 2 ;; esac
if ! [[ $OUT =~ ^[A-Za-z0-9._-]+$ ]]; then echo "compare.sh: --out must be a plain file name" >&2; exit 2; fi
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
    for d in "$WORK/source" "$WORK/target"; do
        [ -f "$d/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1
    done
    if [ -d "$WORK/logs" ]; then
        mkdir -p "$LOGDIR"
        rm -f "$LOGDIR"/*.log "$LOGDIR"/*.txt
        cp "$WORK"/logs/*.log "$WORK"/logs/*.txt "$LOGDIR/" 2>/dev/null
        for d in source target; do
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

start_cluster() {   # name port
    local name=$1 port=$2 dir="$WORK/$1"
    mkdir -p "$dir"
    [ "$IS_ROOT" = 1 ] && chown postgres "$dir"
    chmod 700 "$dir"
    as_pg "$PGBIN/initdb" -D "$dir" -U postgres --pwfile="$WORK/pwfile" \
        --auth-host=scram-sha-256 --auth-local=trust -E UTF8 --locale=C >"$WORK/logs/initdb-$name.log" 2>&1 \
        || die "initdb of $name failed: $(tail -n 5 "$WORK/logs/initdb-$name.log")"
    local workers=$((JOBS + 6)); [ $workers -lt 8 ] && workers=8
    local lrworkers=$((JOBS + 2)); [ $lrworkers -lt 4 ] && lrworkers=4
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
    : >"$WORK/$name.log"
    [ "$IS_ROOT" = 1 ] && chown postgres "$WORK/$name.log"
    as_pg "$PGBIN/pg_ctl" -D "$dir" -l "$WORK/$name.log" -w -t 60 start >/dev/null \
        || die "starting $name failed: $(tail -n 5 "$WORK/$name.log")"
}

# psql helpers: q PORT [DB] -c ... ; qs/qt run one statement on source/target bench
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
SRC_CONNINFO="host=127.0.0.1 port=$SP dbname=bench user=postgres password=$PASSWORD"

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
    subs=$(q "$TP" bench -c "SELECT subname FROM pg_subscription" 2>/dev/null || true)
    for s in $subs; do
        qt "ALTER SUBSCRIPTION $s DISABLE" >/dev/null
        qt "ALTER SUBSCRIPTION $s SET (slot_name = NONE)" >/dev/null
        qt "DROP SUBSCRIPTION $s" >/dev/null
    done
    drop_source_replication
    qt_admin "DROP DATABASE IF EXISTS bench WITH (FORCE)" >/dev/null
    qt_admin "CREATE DATABASE bench" >/dev/null
}
drop_source_replication() {
    local i
    qs_admin "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = 'bench' AND active_pid IS NOT NULL" >/dev/null
    for i in $(seq 1 100); do
        [ "$(qs_admin "SELECT count(*) FROM pg_replication_slots WHERE database = 'bench' AND active")" = 0 ] && break
        sleep 0.1
    done
    qs_admin "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = 'bench'" >/dev/null
    qs "DO \$\$ DECLARE p text; BEGIN FOR p IN SELECT pubname FROM pg_publication LOOP EXECUTE format('DROP PUBLICATION %I', p); END LOOP; END \$\$" >/dev/null
}
reset_source() {
    drop_source_replication
    qs_admin "DROP DATABASE bench WITH (FORCE)" >/dev/null
    qs_admin "CREATE DATABASE bench TEMPLATE bench_tpl STRATEGY FILE_COPY" >/dev/null
}

# poll_until PORT SQL TIMEOUT [INTERVAL]: SQL must return `bool`; one psql session
# runs it every INTERVAL seconds (\watch) and this prints the server's epoch time of
# the first true row, or nothing on timeout.
poll_until() {
    local port=$1 sql=$2 timeout=$3 interval=${4:-0.05}
    { printf 'SELECT extract(epoch FROM clock_timestamp()), (%s)\n\\watch %s\n' "$sql" "$interval" |
        timeout "$timeout" "$PSQL" -X -At -F ' ' -h 127.0.0.1 -p "$port" -U postgres -d bench 2>>"$WORK/logs/poll.log" || true; } |
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
    maxid=$(qs "SELECT max(id) FROM recommendations")
    seen=$(poll_until "$TP" "coalesce((SELECT max(id) FROM recommendations), 0) >= $maxid" 900)
    [ -n "$seen" ] || { broke "$tool: bulk apply: target did not show the inserted rows within 900 s"; return 1; }
    count=$(qt "SELECT count(*) FROM recommendations")
    [ "$count" = $((before + BULK_ROWS)) ] || broke "$tool: bulk apply: target has $count rows, expected $((before + BULK_ROWS))"
    record bulk_source_txn_s "$tool" "$(elapsed "$t_start" "$t_commit")"
    record bulk_apply_from_commit_s "$tool" "$(elapsed "$t_commit" "$seen")"
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
ws_start_run() {   # logname
    # shellcheck disable=SC2086  # WALSHUTTLE_RUN_ARGS: extra flags, split on spaces
    "$WS" --source "$SRC_URL" --target "$TGT_URL" run ${WALSHUTTLE_RUN_ARGS:-} >"$WORK/logs/walshuttle-$1.log" 2>&1 &
    WS_PID=$!; track "$WS_PID"
}
# waits until the walshuttle slot has an active consumer
ws_wait_streaming() {
    local seen
    seen=$(poll_until "$SP" "EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'walshuttle' AND active)" 120 0.1)
    if [ -z "$seen" ] || ! kill -0 "$WS_PID" 2>/dev/null; then
        broke "walshuttle run did not start streaming within 120 s: $(tail -n 5 "$WORK/logs/walshuttle-$1.log" | tr '\n' ' ')"
        return 1
    fi
}
# SIGTERM, wait for the exit (60 s), record the peak RSS read just before
ws_stop() {   # phase logname
    local phase=$1 name=$2 hwm rc=0 i
    hwm=$(hwm_kib "$WS_PID")
    if ! kill -0 "$WS_PID" 2>/dev/null; then
        wait "$WS_PID" || rc=$?
        broke "walshuttle run ($name) had already exited (code $rc) before it was stopped: $(tail -n 5 "$WORK/logs/walshuttle-$name.log" | tr '\n' ' ')"
        return 1
    fi
    [ -n "$hwm" ] && record "peak_rss_mib_$phase" walshuttle "$(kib_to_mib "$hwm")"
    local t0; t0=$(now)
    kill -TERM "$WS_PID"
    for i in $(seq 1 600); do kill -0 "$WS_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$WS_PID" 2>/dev/null; then
        kill -KILL "$WS_PID" 2>/dev/null || true
        wait "$WS_PID" 2>/dev/null || true
        broke "walshuttle run ($name) did not exit within 60 s of SIGTERM (killed): $(tail -n 5 "$WORK/logs/walshuttle-$name.log" | tr '\n' ' ')"
        return 1
    fi
    wait "$WS_PID" || rc=$?
    record "sigterm_exit_s_$phase" walshuttle "$(elapsed "$t0" "$(now)")"
    if [ "$rc" != 0 ]; then
        broke "walshuttle run ($name) exited $rc on SIGTERM: $(tail -n 5 "$WORK/logs/walshuttle-$name.log" | tr '\n' ' ')"
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
run_walshuttle() {
    set_step "walshuttle: reset"
    reset_target; reset_source; checkpoint_both
    set_step "walshuttle bootstrap"
    log "walshuttle: bootstrap --jobs $JOBS"
    local t0 t1 rc=0 wd seen
    copy_clock_start walshuttle
    t0=$(now)
    "$WS" --source "$SRC_URL" --target "$TGT_URL" bootstrap --jobs "$JOBS" >"$WORK/logs/walshuttle-bootstrap.log" 2>&1 &
    local pid=$!; track "$pid"
    watchdog "$pid" 900 "$WORK/hwm-bootstrap" & wd=$!; track "$wd"
    wait "$pid" || rc=$?
    t1=$(now)
    copy_clock_end walshuttle
    wait "$wd" 2>/dev/null || true
    [ -f "$WORK/hwm-bootstrap" ] && record peak_rss_mib_bootstrap walshuttle "$(kib_to_mib "$(cat "$WORK/hwm-bootstrap")")"
    if [ -f "$WORK/hwm-bootstrap.timeout" ]; then
        broke "walshuttle bootstrap did not finish within 900 s (killed): $(tail -n 5 "$WORK/logs/walshuttle-bootstrap.log" | tr '\n' ' ')"
        return 1
    fi
    if [ "$rc" != 0 ]; then
        broke "walshuttle bootstrap exited $rc: $(tail -n 5 "$WORK/logs/walshuttle-bootstrap.log" | tr '\n' ' ')"
        return 1
    fi
    check_counts walshuttle
    record initial_copy_s walshuttle "$(elapsed "$t0" "$t1")"
    log "walshuttle: initial copy $(elapsed "$t0" "$t1") s"
    [ "$ONLY" = copy ] && return 0

    set_step "walshuttle: bulk apply"
    ws_start_run run-bulk
    ws_wait_streaming run-bulk
    sleep 2
    bulk_apply walshuttle
    set_step "walshuttle: backlog drain"
    ws_stop bulk_apply run-bulk
    backlog_write walshuttle
    log "walshuttle: backlog: starting walshuttle run again"
    t0=$(now)
    ws_start_run run-backlog
    seen=$(wait_marker "$MARK_SEQ" 900)
    [ -n "$seen" ] || { broke "walshuttle: backlog not drained within 900 s: $(tail -n 5 "$WORK/logs/walshuttle-run-backlog.log" | tr '\n' ' ')"; return 1; }
    record backlog_drain_s walshuttle "$(elapsed "$t0" "$seen")"
    log "walshuttle: backlog drained in $(elapsed "$t0" "$seen") s (from process start)"
    check_consistent walshuttle backlog_drain
    ws_stop backlog_drain run-backlog

    set_step "walshuttle: steady state"
    ws_start_run run-steady
    ws_wait_streaming run-steady
    seen=$(wait_marker "$(source_marker)" 120)
    [ -n "$seen" ] || { broke "walshuttle: not caught up before the steady-state load"; return 1; }
    idle_latency walshuttle
    steady_state walshuttle walshuttle
    ws_stop steady_state run-steady
}

# --- native logical replication ----------------------------------------------------
run_native() {
    set_step "native: reset"
    reset_target; reset_source
    q "$TP" bench -f "$SCHEMA_PRE" >/dev/null 2>"$WORK/logs/native-schema.log"
    q "$TP" bench -f "$SCHEMA_POST" >/dev/null 2>>"$WORK/logs/native-schema.log"
    qs "CREATE PUBLICATION bench_pub FOR ALL TABLES" >/dev/null
    checkpoint_both
    set_step "native: initial copy"
    log "native: CREATE SUBSCRIPTION ... WITH (copy_data = true, streaming = $NATIVE_STREAMING)"
    local t0 t1 seen
    copy_clock_start native
    t0=$(now)
    qt "CREATE SUBSCRIPTION bench_sub CONNECTION '$SRC_CONNINFO' PUBLICATION bench_pub WITH (copy_data = true, streaming = $NATIVE_STREAMING)" >/dev/null 2>>"$WORK/logs/native-schema.log"
    seen=$(poll_until "$TP" "(SELECT count(*) FILTER (WHERE srsubstate = 'r') = $NTABLES AND count(*) = $NTABLES FROM pg_subscription_rel)" 1800 0.05)
    copy_clock_end native
    [ -n "$seen" ] || { broke "native: subscription tables not all ready within 1800 s"; return 1; }
    record initial_copy_s native "$(elapsed "$t0" "$seen")"
    log "native: initial copy $(elapsed "$t0" "$seen") s"
    check_counts native
    [ "$ONLY" = copy ] && return 0

    set_step "native: bulk apply"
    seen=$(poll_until "$SP" "EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'bench_sub' AND active)" 120 0.1)
    [ -n "$seen" ] || { broke "native: apply worker not streaming"; return 1; }
    sleep 2
    bulk_apply native

    set_step "native: backlog drain"
    qt "ALTER SUBSCRIPTION bench_sub DISABLE" >/dev/null
    seen=$(poll_until "$SP" "NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'bench_sub' AND active)" 120 0.1)
    [ -n "$seen" ] || { broke "native: apply worker did not stop after DISABLE"; return 1; }
    backlog_write native
    log "native: backlog: ALTER SUBSCRIPTION ... ENABLE"
    t0=$(now)
    qt "ALTER SUBSCRIPTION bench_sub ENABLE" >/dev/null
    seen=$(wait_marker "$MARK_SEQ" 900)
    [ -n "$seen" ] || { broke "native: backlog not drained within 900 s"; return 1; }
    record backlog_drain_s native "$(elapsed "$t0" "$seen")"
    log "native: backlog drained in $(elapsed "$t0" "$seen") s (from ENABLE)"
    check_consistent native backlog_drain

    set_step "native: steady state"
    idle_latency native
    steady_state native bench_sub
    local wrss
    wrss=$(qt "SELECT pid FROM pg_stat_subscription WHERE subname = 'bench_sub' AND relid IS NULL" || true)
    if [ -n "$wrss" ] && [ -r "/proc/$wrss/status" ]; then
        record peak_rss_mib_steady_state native_apply_worker "$(kib_to_mib "$(hwm_kib "$wrss")")"
    fi
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
part run_pgcopydb
part run_psql_pipe
part run_walshuttle
part run_native
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
PEERS=(pgcopydb native psql_pipe)
OTHER_KEYS=(bulk_source_txn_s backlog_write_s backlog_wal_bytes steady_pgbench_tps steady_lag_seconds_max steady_lag_bytes_max steady_final_catchup_s sigterm_exit_s_bulk_apply sigterm_exit_s_backlog_drain sigterm_exit_s_steady_state consistent_after_backlog_drain consistent_after_steady_state initial_copy_target_indexes)
if [ "$ONLY" = copy ]; then
    ROWDEFS=("${ROWDEFS[0]}" "peak_rss_mib_bootstrap|walshuttle peak RSS: bootstrap|MiB")
    OTHER_KEYS=(initial_copy_target_indexes)
fi

fmt() { [ -n "$1" ] && echo "$1" || echo "—"; }

# ---- terminal table + markdown ----
MD="$RESULTS/$OUT.md"
{
    echo "# walshuttle vs peers$([ "$ONLY" = copy ] && echo ", initial copy only") — $DATE"
    echo
    echo "- machine: $NPROC CPUs ($CPU_MODEL), $RAM_GIB GiB RAM"
    echo "- PostgreSQL $PG_VERSION (source and target clusters on this machine, fsync $([ "$FAST" = 1 ] && echo off || echo on))"
    echo "- walshuttle $WS_VERSION: binary sha256 $WS_SHA… built $WS_BUILT${WALSHUTTLE_BIN_REV:+ from $WALSHUTTLE_BIN_REV}; repository HEAD $GIT_REV$([ "$GIT_DIRTY" = true ] && echo " with uncommitted changes in src (the binary may predate them)")"
    echo "- pgcopydb ${PGCOPYDB_VERSION:-not installed}"
    echo "- data: scale $SCALE = $SRC_ROWS recommendation rows, source database $DB_PRETTY; --jobs $JOBS"
    [ -n "${WALSHUTTLE_RUN_ARGS:-}" ] && echo "- extra \`walshuttle run\` flags: ${WALSHUTTLE_RUN_ARGS}"
    echo "- total measurement time $(elapsed "$T_ALL0" "$T_ALL1") s; 1-minute load average before the run $LOAD_START, at the start of each part: $(awk -F'\t' '$1 == "load_avg_1m_at_start" { printf "%s%s %s", sep, $2, $3; sep = ", " }' "$METRICS")"
    echo "- 1-minute load average when each initial copy's clock started → stopped: $(for t in walshuttle "${PEERS[@]}"; do a=$(val initial_copy_load_start "$t"); b=$(val initial_copy_load_end "$t"); [ -n "$a" ] && printf '%s%s %s → %s' "${sep-}" "$t" "$a" "${b:-?}" && sep=", "; done; unset sep)$([ -n "$WAIT_LOAD" ] && echo "; each waited for a load below $WAIT_LOAD (at most $WAIT_MAX s)")"
    echo
    echo "Times and lag: lower is better; a ratio is walshuttle / peer (below 1 = walshuttle better)."
    echo
    echo "| measurement | unit | walshuttle | pgcopydb | native | psql pipe | ws/pgcopydb | ws/native | ws/psql pipe |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    for def in "${ROWDEFS[@]}"; do
        IFS='|' read -r key label unit <<<"$def"
        w=$(val "$key" walshuttle)
        line="| $label | $unit | $(fmt "$w")"
        for p in "${PEERS[@]}"; do line="$line | $(fmt "$(val "$key" "$p")")"; done
        for p in "${PEERS[@]}"; do line="$line | $(fmt "$(ratio "$w" "$(val "$key" "$p")")")"; done
        echo "$line |"
    done
    echo
    echo "Other figures:"
    echo
    echo "| figure | walshuttle | native |"
    echo "|---|---:|---:|"
    for key in "${OTHER_KEYS[@]}"; do
        echo "| $key | $(fmt "$(val "$key" walshuttle)") | $(fmt "$(val "$key" native)") |"
    done
    pd=$(val initial_copy_data_only_s psql_pipe); pi=$(val initial_copy_index_build_s psql_pipe)
    [ -n "$pd" ] && echo && echo "psql pipe breakdown: data $pd s + keys/indexes $pi s."
    ar=$(val peak_rss_mib_steady_state native_apply_worker)
    [ -n "$ar" ] && echo && echo "Native apply worker (a backend process) peak RSS after steady state: $ar MiB (includes shared memory it touched)."
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
    echo "  \"walshuttle\": {\"version\": $(json_str "$WS_VERSION"), \"binary_sha256_prefix\": $(json_str "$WS_SHA"), \"binary_built\": $(json_str "$WS_BUILT"), \"binary_rev\": $(json_str "${WALSHUTTLE_BIN_REV:-}"), \"repo_head\": $(json_str "$GIT_REV"), \"src_dirty\": $GIT_DIRTY},"
    echo "  \"pgcopydb\": $(json_str "${PGCOPYDB_VERSION:-}"),"
    echo "  \"params\": {\"scale\": $SCALE, \"jobs\": $JOBS, \"fsync\": $([ "$FAST" = 1 ] && echo false || echo true), \"rows\": $SRC_ROWS, \"load_avg_1m_before\": $LOAD_START, \"source_db_bytes\": $DB_BYTES, \"bulk_rows\": $BULK_ROWS, \"backlog_txns\": $BACKLOG_TXNS, \"steady_rate\": $STEADY_RATE, \"steady_seconds\": $STEADY_SECONDS, \"pgcopydb_split\": $(json_str "$SPLIT_THRESHOLD"), \"native_streaming\": $(json_str "$NATIVE_STREAMING"), \"walshuttle_run_args\": $(json_str "${WALSHUTTLE_RUN_ARGS:-}"), \"only\": $(json_str "$ONLY"), \"out\": $(json_str "$OUT"), \"wait_load\": $([ -n "$WAIT_LOAD" ] && echo "$WAIT_LOAD" || echo null)},"
    echo "  \"ratio_definition\": \"walshuttle / peer; lower is better for every measurement\","
    echo "  \"measurements\": ["
    n=${#ROWDEFS[@]}; i=0
    for def in "${ROWDEFS[@]}"; do
        i=$((i + 1))
        IFS='|' read -r key label unit <<<"$def"
        w=$(val "$key" walshuttle)
        printf '    {"name": %s, "label": %s, "unit": %s, "walshuttle": %s' "$(json_str "$key")" "$(json_str "$label")" "$(json_str "$unit")" "$(json_num "$w")"
        for p in "${PEERS[@]}"; do printf ', "%s": %s' "$p" "$(json_num "$(val "$key" "$p")")"; done
        printf ', "ratios": {'
        sep=""
        for p in "${PEERS[@]}"; do printf '%s"%s": %s' "$sep" "$p" "$(json_num "$(ratio "$w" "$(val "$key" "$p")")")"; sep=", "; done
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
    for tool in walshuttle native; do
        printf '%s    "%s": {' "$sep" "$tool"; sep=$',\n'
        isep=""
        for kind in lag-seconds lag-bytes idle-latency; do
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
printf '%-44s %12s %12s %12s %12s %10s %10s %10s\n' "measurement" "walshuttle" "pgcopydb" "native" "psql pipe" "ws/pgcdb" "ws/native" "ws/psql"
for def in "${ROWDEFS[@]}"; do
    IFS='|' read -r key label unit <<<"$def"
    w=$(val "$key" walshuttle)
    printf '%-44s %12s' "$label ($unit)" "$(fmt "$w")"
    for p in "${PEERS[@]}"; do printf ' %12s' "$(fmt "$(val "$key" "$p")")"; done
    for p in "${PEERS[@]}"; do printf ' %10s' "$(fmt "$(ratio "$w" "$(val "$key" "$p")")")"; done
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
