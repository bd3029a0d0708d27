#!/usr/bin/env bash
# What a bootstrap costs the source: the slot's retained WAL and the age of the
# oldest snapshot, sampled every second, for the one-snapshot bootstrap
# (`walshuttle bootstrap`, then `walshuttle run` until caught up), the online one
# (`walshuttle run --online` until every table is ready and caught up), pgcopydb
# `clone` (when installed) and a native subscription, on the same demo data under
# the same light writer, on two throwaway local clusters.
#
#   bench/online.sh [--scale N] [--jobs J] [--rate R] [--port P] [--out FILE]
#
# Results: a Markdown table on stdout and in bench/results/online.md (or FILE).
# Environment: WALSHUTTLE_BIN (default target/release/walshuttle, else
# target/debug/walshuttle), PGBIN (default `pg_config --bindir`).

set -euo pipefail
{

SCALE=100
JOBS=2
RATE=50
BASE_PORT=56300
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT="$REPO/bench/results/online.md"

while [ $# -gt 0 ]; do
    case "$1" in
        --scale) SCALE=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --port) BASE_PORT=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) sed -n 2,13p "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

PGBIN=${PGBIN:-$(pg_config --bindir)}
WS_SRC=${WALSHUTTLE_BIN:-}
if [ -z "$WS_SRC" ]; then
    WS_SRC=$REPO/target/release/walshuttle
    [ -x "$WS_SRC" ] || WS_SRC=$REPO/target/debug/walshuttle
fi
[ -x "$WS_SRC" ] || { echo "no walshuttle binary: cargo build --release" >&2; exit 1; }

log() { printf '%s  %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
WORK=$(mktemp -d /tmp/walshuttle-online.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/sock" "$WORK/logs"
WS="$WORK/walshuttle"; cp "$WS_SRC" "$WS"
IS_ROOT=0; [ "$(id -u)" = 0 ] && IS_ROOT=1
as_pg() { if [ "$IS_ROOT" = 1 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$IS_ROOT" = 1 ] && chown postgres "$WORK/sock"
PIDS=()
cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    for d in source target; do
        [ -f "$WORK/$d/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$WORK/$d" -m immediate -w stop >/dev/null 2>&1 || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
next_port() { local p=$1; while ! port_free "$p"; do p=$((p + 1)); done; echo "$p"; }
export PGPASSWORD=bench
printf 'bench\n' >"$WORK/pwfile"; chmod 644 "$WORK/pwfile"
start_cluster() {   # name port
    local dir="$WORK/$1"
    mkdir -p "$dir"; [ "$IS_ROOT" = 1 ] && chown postgres "$dir"; chmod 700 "$dir"
    as_pg "$PGBIN/initdb" -D "$dir" -U postgres --pwfile="$WORK/pwfile" \
        --auth-host=scram-sha-256 --auth-local=trust -E UTF8 --locale=C >"$WORK/logs/initdb-$1.log" 2>&1
    cat >>"$dir/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $2
unix_socket_directories = '$WORK/sock'
wal_level = logical
max_wal_senders = 20
max_replication_slots = 20
shared_buffers = 256MB
max_wal_size = 4GB
EOF
    : >"$WORK/$1.log"; [ "$IS_ROOT" = 1 ] && chown postgres "$WORK/$1.log"
    as_pg "$PGBIN/pg_ctl" -D "$dir" -l "$WORK/$1.log" -w -t 60 start >/dev/null
}
SP=$(next_port "$BASE_PORT"); TP=$(next_port $((SP + 1)))
q() { local port=$1 db=$2; shift 2; psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$db" "$@"; }
qs() { q "$SP" bench -c "$1"; }
qt() { q "$TP" bench -c "$1"; }
export WALSHUTTLE_SOURCE="postgresql://postgres:bench@127.0.0.1:$SP/bench"
export WALSHUTTLE_TARGET="postgresql://postgres:bench@127.0.0.1:$TP/bench"

log "workspace $WORK; source port $SP, target port $TP; binary $WS_SRC"
start_cluster source "$SP"; start_cluster target "$TP"
q "$SP" postgres -c "CREATE DATABASE bench" >/dev/null
log "loading demo data, scale $SCALE"
q "$SP" bench -f "$REPO/migrations/schema.sql" >/dev/null
q "$SP" bench -v scale="$SCALE" -f "$REPO/migrations/generate.sql" >/dev/null
qs "VACUUM (FREEZE, ANALYZE)" >/dev/null
DB_PRETTY=$(qs "SELECT pg_size_pretty(pg_database_size('bench'))")
RECS=$(qs "SELECT count(*) FROM recommendations")
MAXREC=$(qs "SELECT max(id) FROM recommendations")
MAXUSER=$(qs "SELECT max(id) FROM users")

# The light writer: one small transaction updating a recommendation and a user.
cat >"$WORK/writer.sql" <<EOF
\set r random(1, $MAXREC)
\set u random(1, $MAXUSER)
BEGIN;
UPDATE recommendations SET score = score + 0.001, updated_at = now() WHERE id = :r;
UPDATE users SET updated_at = now() WHERE id = :u;
COMMIT;
EOF

# Samples every second: retained WAL of every slot, and the age of the oldest
# snapshot held by any session (the sampler's own is new).
sampler() {   # file
    while true; do
        qs "SELECT coalesce((SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) FROM pg_replication_slots), 0)::bigint,
                   coalesce((SELECT extract(epoch FROM max(now() - xact_start)) FROM pg_stat_activity
                             WHERE backend_xmin IS NOT NULL AND pid <> pg_backend_pid()), 0)::numeric(12,1)" \
            | tr '|' ' ' >>"$1" 2>/dev/null || true
        sleep 1
    done
}

table_sampler() {   # file: per second, each table's state on the target
    while true; do
        qt "SELECT extract(epoch FROM clock_timestamp())::numeric(14,1), schema_name || '.' || table_name, state
              FROM walshuttle.pipeline_tables" 2>/dev/null | tr '|' ' ' >>"$1" || true
        sleep 1
    done
}

# The longest a table stayed `copied` (its copy in, its held changes replaying)
# before it was `ready`: the replay's lag behind the writer.
replay_lag() {   # file
    awk '$3 == "copied" && !($2 in c) { c[$2] = $1 }
         $3 == "ready" && ($2 in c) && !($2 in r) { r[$2] = $1 }
         END { m = 0; n = 0; for (t in c) n++; for (t in r) if (r[t] - c[t] > m) m = r[t] - c[t];
               printf "%.0f s (%d of the tables were seen copied and replaying)", m, n }' "$1"
}

reset() {
    q "$TP" postgres -c "DROP DATABASE IF EXISTS bench" >/dev/null
    q "$TP" postgres -c "CREATE DATABASE bench" >/dev/null
    qs "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots" >/dev/null
    qs "DROP PUBLICATION IF EXISTS walshuttle" >/dev/null
}

caught_up() {   # true when the slot confirmed past the source's position now
    local now
    now=$(qs "SELECT pg_current_wal_lsn()")
    until [ "$(qs "SELECT coalesce(confirmed_flush_lsn >= '$now', false) FROM pg_replication_slots WHERE slot_name = 'walshuttle'")" = t ]; do
        sleep 1
    done
}

all_ready() {
    until [ "$(qt "SELECT count(*) FILTER (WHERE state <> 'ready') = 0 AND count(*) > 0 FROM walshuttle.pipeline_tables" 2>/dev/null)" = t ]; do
        sleep 1
    done
}

measure() {   # mode
    local mode=$1 samples="$WORK/samples-$1" t0 t1 runpid
    reset; : >"$samples"
    pgbench -n -h 127.0.0.1 -p "$SP" -U postgres -f "$WORK/writer.sql" -R "$RATE" -T 100000 bench >"$WORK/logs/pgbench-$mode.log" 2>&1 &
    local writer=$!; PIDS+=("$writer")
    sampler "$samples" & local smp=$!; PIDS+=("$smp")
    sleep 2
    t0=$(date +%s.%N)
    runpid=
    case "$mode" in
        one-snapshot)
            "$WS" bootstrap --jobs "$JOBS" >"$WORK/logs/$mode-bootstrap.log" 2>&1
            "$WS" run --jobs "$JOBS" >"$WORK/logs/$mode-run.log" 2>&1 & runpid=$!
            PIDS+=("$runpid"); all_ready; caught_up ;;
        online)
            table_sampler "$WORK/tables-$mode" & PIDS+=($!)
            "$WS" run --online --jobs "$JOBS" >"$WORK/logs/$mode-run.log" 2>&1 & runpid=$!
            PIDS+=("$runpid"); all_ready; caught_up
            kill "${PIDS[-2]}" 2>/dev/null || true
            replay_lag "$WORK/tables-$mode" >"$WORK/replay-lag"
            log "online: longest copied-to-ready (held changes replaying): $(cat "$WORK/replay-lag")" ;;
        native)
            # As an operator would: the schema first, then a subscription that copies
            # every table (one tablesync worker and temporary slot per table) and
            # streams; done when every table is ready and the slot caught up.
            pg_dump -s -h 127.0.0.1 -p "$SP" -U postgres bench | q "$TP" bench >/dev/null
            qs "CREATE PUBLICATION walshuttle FOR ALL TABLES" >/dev/null
            qt "ALTER SYSTEM SET max_sync_workers_per_subscription = $JOBS" >/dev/null
            qt "SELECT pg_reload_conf()" >/dev/null
            qt "CREATE SUBSCRIPTION walshuttle CONNECTION 'host=127.0.0.1 port=$SP user=postgres password=bench dbname=bench' PUBLICATION walshuttle WITH (binary = true)" >/dev/null
            until [ "$(qt "SELECT count(*) FILTER (WHERE srsubstate <> 'r') = 0 AND count(*) > 0 FROM pg_subscription_rel")" = t ]; do sleep 1; done
            caught_up ;;
        pgcopydb)
            # A one-snapshot copy without a slot (no --follow): what its snapshot costs.
            pgcopydb clone --source "$WALSHUTTLE_SOURCE" --target "$WALSHUTTLE_TARGET" \
                --table-jobs "$JOBS" --index-jobs "$JOBS" --dir "$WORK/pgcopydb" \
                >"$WORK/logs/$mode.log" 2>&1 ;;
    esac
    t1=$(date +%s.%N)
    kill $runpid "$writer" "$smp" 2>/dev/null || true
    wait $runpid "$writer" "$smp" 2>/dev/null || true
    local wal age
    wal=$(awk 'BEGIN { m = 0 } $1 > m { m = $1 } END { printf "%.1f", m / 1048576 }' "$samples")
    age=$(awk 'BEGIN { m = 0 } $2 > m { m = $2 } END { printf "%.1f", m }' "$samples")
    local secs; secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
    log "$mode: $secs s to ready and caught up; max retained WAL $wal MB; oldest snapshot $age s"
    printf '| %s | %s | %s | %s |\n' "$mode" "$secs" "$wal" "$age" >>"$WORK/rows"
}

: >"$WORK/rows"
measure one-snapshot
measure online
if command -v pgcopydb >/dev/null 2>&1; then measure pgcopydb; fi
measure native

{
    echo "# Online bootstrap: what the source pays"
    echo
    echo "bench/online.sh --scale $SCALE --jobs $JOBS --rate $RATE, $(date -u +%Y-%m-%d), PostgreSQL $(qs 'SHOW server_version'),"
    echo "binary $(basename "$(dirname "$WS_SRC")") build; source $DB_PRETTY ($RECS recommendation rows);"
    echo "a pgbench writer at $RATE tps (one recommendation and one user updated per transaction)"
    echo "during the whole bootstrap. Sampled every second on the source: the slot's retained"
    echo "WAL (pg_current_wal_lsn() - restart_lsn) and the oldest snapshot (max(now() - xact_start)"
    echo "over sessions with a backend_xmin). Time: start to every table ready and the slot"
    echo "confirmed past the source's position at that moment."
    echo
    echo "| mode | seconds | max retained WAL (MB) | oldest snapshot (s) |"
    echo "|---|---|---|---|"
    cat "$WORK/rows"
    if [ -s "$WORK/replay-lag" ]; then
        echo
        echo "Online: the longest a table stayed \`copied\` (copy in, held changes replaying"
        echo "under the writer) before it was \`ready\`: $(cat "$WORK/replay-lag"), sampled every second."
    fi
} | tee "$OUT"
}
