#!/usr/bin/env bash
# The backlog drain, alone and quickly: walshuttle (one or more binaries) against native
# logical replication, in one run, on two throwaway local PostgreSQL clusters.
#
# A table t (id bigint primary key, v int, payload text) with a secondary index on v;
# with the replicator stopped, N single-row random UPDATEs of v, each its own source
# transaction, then one marker transaction; the replicator is started and the clock
# runs until the target shows the marker (both apply in commit order, so every update
# is applied by then). See bench/README.md (backlog.sh).
#
#   bench/backlog.sh [--rows R] [--txns N] [--repeat K] [--port P] [--keep] [--out NAME]
#                    [--bin NAME=PATH]... [--explain] [--no-native]
#
# Results: bench/results/NAME.md (default backlog.md), logs in bench/results/logs/NAME/.

set -euo pipefail
# One block, parsed before it runs (and left by `exit`): editing the file while a run
# is in progress cannot change the run.
{

ROWS=2000000
TXNS=60000
REPEAT=1
BASE_PORT=56300
KEEP=0
OUT=backlog
EXPLAIN=0
NATIVE=1
SCHEMA=simple
VACUUM_TARGET=0
NATIVE_INDEXES_FIRST=0
BINS=()

usage() {
    cat <<'EOF'
bench/backlog.sh: time to drain a backlog of single-row update transactions,
walshuttle against native logical replication (PostgreSQL 15), in one run.

  --rows R         rows of the table (default 2000000)
  --txns N         single-row UPDATE transactions in the backlog (default 60000)
  --repeat K       measure every tool K times, alternating (default 1)
  --bin NAME=PATH  a walshuttle binary to measure, under NAME (repeatable; default
                   walshuttle=target/release/walshuttle)
  --schema S       simple (default): t (id bigint primary key, v int, payload text),
                   an index on v, updates setting v; demo: the demo schema
                   (migrations/, recommendations with 3 secondary indexes, rows/100000
                   as the scale) and compare.sh's update of score and updated_at;
                   tpcb: pgbench's TPC-B tables (scale rows/100000, pgbench_history
                   given a primary key) and --txns TPC-B transactions from 8 clients
  --vacuum-target  VACUUM (FREEZE, ANALYZE) each target before the backlog (default:
                   as the replicator left it)
  --no-native      skip native logical replication
  --native-indexes-first
                   native's target gets its keys and indexes before its rows, as
                   after CREATE SUBSCRIPTION's copy into a schema from pg_dump
                   (compare.sh); default: rows first, then keys and indexes, as
                   walshuttle bootstrap builds them
  --explain        auto_explain (log_analyze) and log_min_duration_statement = 0 on the
                   target, for finding what bounds the apply: slows every tool, so the
                   times of such a run are not figures; the target's log is kept
  --port P         first port tried (default 56300)
  --keep           keep the temporary directory
  --out NAME       bench/results/NAME.md and logs/NAME/ (default backlog)
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --rows) ROWS=$2; shift 2 ;;
        --txns) TXNS=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        --bin) BINS+=("$2"); shift 2 ;;
        --no-native) NATIVE=0; shift ;;
        --schema) SCHEMA=$2; shift 2 ;;
        --vacuum-target) VACUUM_TARGET=1; shift ;;
        --native-indexes-first) NATIVE_INDEXES_FIRST=1; shift ;;
        --explain) EXPLAIN=1; shift ;;
        --port) BASE_PORT=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "backlog.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for v in ROWS TXNS REPEAT BASE_PORT; do
    if ! [[ ${!v} =~ ^[0-9]+$ ]] || [ "${!v}" -lt 1 ]; then
        echo "backlog.sh: ${v,,} must be a positive integer" >&2; exit 2
    fi
done
case "$SCHEMA" in simple|demo|tpcb) ;; *) echo "backlog.sh: --schema simple|demo|tpcb" >&2; exit 2 ;; esac
if ! [[ $OUT =~ ^[A-Za-z0-9._-]+$ ]]; then echo "backlog.sh: --out must be a plain file name" >&2; exit 2; fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS="$REPO/bench/results"
LOGDIR="$RESULTS/logs/$OUT"
if [ -z "${PGBIN:-}" ]; then
    if [ -x /usr/lib/postgresql/15/bin/postgres ]; then PGBIN=/usr/lib/postgresql/15/bin
    else PGBIN=$(pg_config --bindir); fi
fi
PSQL="$PGBIN/psql"
[ ${#BINS[@]} -gt 0 ] || BINS=("walshuttle=$REPO/target/release/walshuttle")

log() { printf '%s  %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
loadavg() { cut -d' ' -f1 /proc/loadavg; }

WORK=$(mktemp -d /tmp/walshuttle-backlog.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/logs" "$WORK/sock" "$WORK/bin"
RESULTS_TSV="$WORK/results.tsv"   # tool <TAB> round <TAB> drain s <TAB> load start <TAB> load end <TAB> consistent
: >"$RESULTS_TSV"
PIDS="$WORK/pids"; : >"$PIDS"
FAILED=0

# snapshot every binary: a rebuild during the run must not change what is measured
NAMES=()
BIN_INFO=""
for spec in "${BINS[@]}"; do
    name=${spec%%=*}; path=${spec#*=}
    [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || die "--bin NAME=PATH: NAME must be a plain word"
    [ -x "$path" ] || die "no walshuttle binary at $path (cargo build --release)"
    cp "$path" "$WORK/bin/$name"
    NAMES+=("$name")
    BIN_INFO="$BIN_INFO
- \`$name\`: $path, sha256 $(sha256sum "$path" | cut -c1-16), built $(date -u -r "$path" +%Y-%m-%dT%H:%M:%SZ)"
done

IS_ROOT=0; [ "$(id -u)" = 0 ] && IS_ROOT=1
as_pg() { if [ "$IS_ROOT" = 1 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$IS_ROOT" = 1 ] && chown postgres "$WORK/sock"

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    while read -r pid; do
        [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null
    done <"$PIDS"
    sleep 0.5
    for d in "$WORK/source" "$WORK/target"; do
        [ -f "$d/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1
    done
    mkdir -p "$LOGDIR"
    rm -f "$LOGDIR"/*.log
    cp "$WORK"/logs/*.log "$LOGDIR/" 2>/dev/null
    if [ "$EXPLAIN" = 1 ]; then cp "$WORK/target.log" "$LOGDIR/postgres-target-full.log"
    else tail -n 300 "$WORK/target.log" >"$LOGDIR/postgres-target.log" 2>/dev/null; fi
    tail -n 100 "$WORK/source.log" >"$LOGDIR/postgres-source.log" 2>/dev/null
    if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
next_port() { local p=$1; while ! port_free "$p"; do p=$((p + 1)); done; echo "$p"; }

export PGPASSWORD=bench
printf 'bench\n' >"$WORK/pwfile"; chmod 644 "$WORK/pwfile"

start_cluster() {   # name port extra-settings
    local name=$1 port=$2 dir="$WORK/$1"
    mkdir -p "$dir"; [ "$IS_ROOT" = 1 ] && chown postgres "$dir"; chmod 700 "$dir"
    as_pg "$PGBIN/initdb" -D "$dir" -U postgres --pwfile="$WORK/pwfile" \
        --auth-host=scram-sha-256 --auth-local=trust -E UTF8 --locale=C >"$WORK/logs/initdb-$name.log" 2>&1 \
        || die "initdb of $name failed"
    cat >>"$dir/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$WORK/sock'
wal_level = logical
max_wal_senders = 20
max_replication_slots = 20
shared_buffers = 512MB
max_wal_size = 4GB
checkpoint_timeout = 30min
fsync = on
max_worker_processes = 8
max_logical_replication_workers = 4
$3
EOF
    : >"$WORK/$name.log"; [ "$IS_ROOT" = 1 ] && chown postgres "$WORK/$name.log"
    as_pg "$PGBIN/pg_ctl" -D "$dir" -l "$WORK/$name.log" -w -t 60 start >/dev/null \
        || die "starting $name failed: $(tail -n 5 "$WORK/$name.log")"
}

q() { local port=$1 db=$2; shift 2; "$PSQL" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$db" "$@"; }
qs() { q "$SP" bench -c "$1"; }
qt() { q "$TP" bench -c "$1"; }
checkpoint_both() { q "$SP" postgres -c CHECKPOINT >/dev/null; q "$TP" postgres -c CHECKPOINT >/dev/null; }

SP=$(next_port "$BASE_PORT")
TP=$(next_port $((SP + 1)))
SRC_URL="postgresql://postgres:bench@127.0.0.1:$SP/bench"
TGT_URL="postgresql://postgres:bench@127.0.0.1:$TP/bench"
SRC_CONNINFO="host=127.0.0.1 port=$SP dbname=bench user=postgres password=bench"
TARGET_EXTRA=""
if [ "$EXPLAIN" = 1 ]; then
    TARGET_EXTRA="shared_preload_libraries = 'auto_explain'
auto_explain.log_min_duration = 0
auto_explain.log_analyze = on
auto_explain.log_buffers = on
log_min_duration_statement = 0"
fi
log "workspace $WORK; source on port $SP, target on port $TP; fsync on"
start_cluster source "$SP" ""
start_cluster target "$TP" "$TARGET_EXTRA"
PG_VERSION=$(q "$SP" postgres -c "SHOW server_version")

# The same rows on both sides: the source from a template; native's target restored
# from a dump of it; walshuttle's target gets them by bootstrap.
log "loading $ROWS rows ($SCHEMA schema)"
q "$SP" postgres -c "CREATE DATABASE bench_tpl" >/dev/null
if [ "$SCHEMA" = simple ]; then
    TABLE=t
    q "$SP" bench_tpl -c "CREATE TABLE t (id bigint PRIMARY KEY, v int NOT NULL, payload text NOT NULL)" \
        -c "INSERT INTO t SELECT g, ((g::bigint * 7919) % 1000003)::int, repeat(md5(g::text), 3) FROM generate_series(1, $ROWS) g" \
        -c "CREATE INDEX t_v_idx ON t (v)" >/dev/null
    printf '\\set id random(1, %s)\n\\set v random(0, 1000000)\nUPDATE t SET v = :v WHERE id = :id;\n' "$ROWS" >"$WORK/update.sql"
    checksum_sql="SELECT count(*) || ':' || sum(hashtext(id::text || '/' || v::text)::bigint) FROM t"
elif [ "$SCHEMA" = tpcb ]; then
    TABLE=pgbench_accounts
    "$PGBIN/pgbench" -i -q -s "$(awk -v r="$ROWS" 'BEGIN { s = int(r / 100000); print (s < 1 ? 1 : s) }')" \
        -h 127.0.0.1 -p "$SP" -U postgres bench_tpl >"$WORK/logs/pgbench-init.log" 2>&1 \
        || die "pgbench -i failed: $(tail -n 3 "$WORK/logs/pgbench-init.log")"
    # every replicated table needs a replica identity; the history gets a key
    q "$SP" bench_tpl -c "ALTER TABLE pgbench_history ADD COLUMN hid bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY" >/dev/null
    checksum_sql="SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ':' || (SELECT sum(bbalance) FROM pgbench_branches) || ':' || (SELECT sum(tbalance) FROM pgbench_tellers) || ':' || (SELECT count(*) FROM pgbench_history)"
else
    TABLE=recommendations
    q "$SP" bench_tpl -f "$REPO/migrations/schema.sql" >/dev/null
    q "$SP" bench_tpl -v scale="$(awk -v r="$ROWS" 'BEGIN { print r / 100000 }')" -f "$REPO/migrations/generate.sql" >/dev/null
    printf '\\set id random(1, %s)\nUPDATE recommendations SET score = random(), updated_at = now() WHERE id = :id;\n' "$ROWS" >"$WORK/update.sql"
    checksum_sql="SELECT count(*) || ':' || sum(hashtext(id::text || '/' || score::text)::bigint) FROM recommendations"
fi
q "$SP" bench_tpl -c "CREATE TABLE heartbeat (id int PRIMARY KEY, seq bigint NOT NULL)" \
    -c "INSERT INTO heartbeat VALUES (1, 0)" -c "VACUUM (FREEZE, ANALYZE)" >/dev/null
TABLE_SIZE=$(q "$SP" bench_tpl -c "SELECT pg_size_pretty(pg_total_relation_size('$TABLE'))")
TABLE_INDEXES=$(q "$SP" bench_tpl -c "SELECT count(*) FROM pg_indexes WHERE tablename = '$TABLE'")
[ "$NATIVE" = 1 ] && "$PGBIN/pg_dump" -h 127.0.0.1 -p "$SP" -U postgres -d bench_tpl -Fc --no-owner --no-acl -f "$WORK/tpl.dump"

reset_source() {
    q "$SP" postgres -c "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE active_pid IS NOT NULL" >/dev/null
    local i
    for i in $(seq 1 100); do
        [ "$(q "$SP" postgres -c "SELECT count(*) FROM pg_replication_slots WHERE active")" = 0 ] && break
        sleep 0.1
    done
    q "$SP" postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots" >/dev/null
    q "$SP" postgres -c "DROP DATABASE IF EXISTS bench WITH (FORCE)" >/dev/null
    q "$SP" postgres -c "CREATE DATABASE bench TEMPLATE bench_tpl STRATEGY FILE_COPY" >/dev/null
}
reset_target() {
    local s
    for s in $(q "$TP" bench -c "SELECT subname FROM pg_subscription" 2>/dev/null || true); do
        qt "ALTER SUBSCRIPTION $s DISABLE; ALTER SUBSCRIPTION $s SET (slot_name = NONE); DROP SUBSCRIPTION $s" >/dev/null
    done
    q "$TP" postgres -c "DROP DATABASE IF EXISTS bench WITH (FORCE)" >/dev/null
    q "$TP" postgres -c "CREATE DATABASE bench" >/dev/null
}

# poll_until PORT SQL TIMEOUT: prints the server's epoch time of the first true row
poll_until() {
    local port=$1 sql=$2 timeout=$3
    { printf 'SELECT extract(epoch FROM clock_timestamp()), (%s)\n\\watch 0.05\n' "$sql" |
        timeout "$timeout" "$PSQL" -X -At -F ' ' -h 127.0.0.1 -p "$port" -U postgres -d bench 2>>"$WORK/logs/poll.log" || true; } |
        { while read -r ts ok; do if [ "$ok" = t ]; then echo "$ts"; break; fi; done; }
}

# the backlog: TXNS single-row updates, each its own transaction, then the marker;
# pgbench's session commits asynchronously (same WAL, same transactions, written faster)
MARK=0
write_backlog() {   # tool
    if [ "$SCHEMA" = tpcb ]; then
        log "$1: writing $TXNS TPC-B transactions from 8 clients"
        PGOPTIONS="-c synchronous_commit=off" "$PGBIN/pgbench" -n -h 127.0.0.1 -p "$SP" -U postgres \
            -b tpcb-like -t "$(( (TXNS + 7) / 8 ))" -c 8 -j 2 bench >"$WORK/logs/pgbench-$1.log" 2>&1 \
            || die "pgbench failed: $(tail -n 3 "$WORK/logs/pgbench-$1.log")"
    else
    log "$1: writing $TXNS single-row update transactions"
    PGOPTIONS="-c synchronous_commit=off" "$PGBIN/pgbench" -n -h 127.0.0.1 -p "$SP" -U postgres \
        -f "$WORK/update.sql" -t "$TXNS" -c 1 bench >"$WORK/logs/pgbench-$1.log" 2>&1 \
        || die "pgbench failed: $(tail -n 3 "$WORK/logs/pgbench-$1.log")"
    fi
    MARK=$(qs "UPDATE heartbeat SET seq = seq + 1 WHERE id = 1 RETURNING seq")
    checkpoint_both
}

finish() {   # tool round t0 seen load0
    local tool=$1 round=$2 t0=$3 seen=$4 load0=$5 s d ok=true
    if [ -z "$seen" ]; then
        log "FAILURE: $tool: backlog not drained within 900 s"; FAILED=1
        printf '%s\t%s\t\t%s\t%s\tfalse\n' "$tool" "$round" "$load0" "$(loadavg)" >>"$RESULTS_TSV"
        return
    fi
    s=$(qs "$checksum_sql"); d=$(qt "$checksum_sql")
    if [ "$s" != "$d" ]; then ok=false; FAILED=1; log "FAILURE: $tool: target ($d) differs from source ($s)"; fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$round" "$(elapsed "$t0" "$seen")" "$load0" "$(loadavg)" "$ok" >>"$RESULTS_TSV"
    log "$tool (round $round): drained in $(elapsed "$t0" "$seen") s (load $load0 -> $(loadavg)); consistent: $ok"
}

measure_walshuttle() {   # name round
    local name=$1 round=$2 ws="$WORK/bin/$1" pid t0 seen load0 i
    reset_target; reset_source
    log "$name: bootstrap (untimed)"
    "$ws" --source "$SRC_URL" --target "$TGT_URL" bootstrap --jobs 2 >"$WORK/logs/$name-$round-bootstrap.log" 2>&1 \
        || die "$name bootstrap failed: $(tail -n 5 "$WORK/logs/$name-$round-bootstrap.log")"
    [ "$VACUUM_TARGET" = 1 ] && qt "VACUUM (FREEZE, ANALYZE)" >/dev/null
    # one run to the streaming state and stopped, as after a deploy
    "$ws" --source "$SRC_URL" --target "$TGT_URL" run >"$WORK/logs/$name-$round-run0.log" 2>&1 &
    pid=$!; echo "$pid" >>"$PIDS"
    [ -n "$(poll_until "$SP" "EXISTS (SELECT 1 FROM pg_replication_slots WHERE active)" 120)" ] || die "$name run did not stream"
    kill -TERM "$pid"; wait "$pid" || die "$name run exited non-zero on SIGTERM"
    write_backlog "$name"
    load0=$(loadavg)
    t0=$(now)
    "$ws" --source "$SRC_URL" --target "$TGT_URL" run >"$WORK/logs/$name-$round-run.log" 2>&1 &
    pid=$!; echo "$pid" >>"$PIDS"
    seen=$(poll_until "$TP" "coalesce((SELECT seq >= $MARK FROM heartbeat WHERE id = 1), false)" 900)
    finish "$name" "$round" "$t0" "$seen" "$load0"
    # CPU seconds the walshuttle process used (it started at t0): user + system
    awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($14 + $15) / hz }' "/proc/$pid/stat" >"$WORK/cpu" 2>/dev/null || echo "" >"$WORK/cpu"
    log "$name (round $round): walshuttle process CPU $(cat "$WORK/cpu") s"
    sed -i "\$ s/\$/\t$(cat "$WORK/cpu")/" "$RESULTS_TSV"
    kill -TERM "$pid"
    for i in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    wait "$pid" || { log "FAILURE: $name run exited non-zero on SIGTERM"; FAILED=1; }
}

measure_native() {   # round
    local round=$1 t0 seen load0
    reset_target; reset_source
    log "native: target rows, publication, slot, subscription (disabled)"
    if [ "$NATIVE_INDEXES_FIRST" = 1 ]; then
        local section
        for section in pre-data post-data data; do
            "$PGBIN/pg_restore" -h 127.0.0.1 -p "$TP" -U postgres -d bench --section=$section --no-owner --no-acl "$WORK/tpl.dump" \
                || die "restoring the target for native failed"
        done
    else
        "$PGBIN/pg_restore" -h 127.0.0.1 -p "$TP" -U postgres -d bench -j 2 --no-owner --no-acl "$WORK/tpl.dump" \
            || die "restoring the target for native failed"
    fi
    [ "$VACUUM_TARGET" = 1 ] && qt "VACUUM (FREEZE, ANALYZE)" >/dev/null
    qs "CREATE PUBLICATION bench_pub FOR ALL TABLES" >/dev/null
    qs "SELECT pg_create_logical_replication_slot('bench_sub', 'pgoutput')" >/dev/null
    qt "CREATE SUBSCRIPTION bench_sub CONNECTION '$SRC_CONNINFO' PUBLICATION bench_pub
        WITH (create_slot = false, slot_name = 'bench_sub', copy_data = false, enabled = false)" >/dev/null
    write_backlog native
    load0=$(loadavg)
    t0=$(now)
    qt "ALTER SUBSCRIPTION bench_sub ENABLE" >/dev/null
    seen=$(poll_until "$TP" "coalesce((SELECT seq >= $MARK FROM heartbeat WHERE id = 1), false)" 900)
    finish native "$round" "$t0" "$seen" "$load0"
    qt "ALTER SUBSCRIPTION bench_sub DISABLE" >/dev/null
}

LOAD_START=$(loadavg)
for round in $(seq 1 "$REPEAT"); do
    # alternate the order each round (A B C, C B A, ...), so drift in the machine's load
    # does not always favour the same tool
    tools=()
    [ "$NATIVE" = 1 ] && tools+=(native)
    tools+=("${NAMES[@]}")
    if [ $((round % 2)) = 0 ]; then
        rev=(); for ((i = ${#tools[@]} - 1; i >= 0; i--)); do rev+=("${tools[$i]}"); done; tools=("${rev[@]}")
    fi
    for tool in "${tools[@]}"; do
        if [ "$tool" = native ]; then measure_native "$round"; else measure_walshuttle "$tool" "$round"; fi
    done
done

# --------------------------------------------------------------- report ----
mkdir -p "$RESULTS"
{
    echo "# Backlog drain: $TXNS single-row update transactions of a $ROWS-row table"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), PostgreSQL $PG_VERSION, $(nproc) cores, fsync on; $SCHEMA schema: table $TABLE $TABLE_SIZE"
    echo "with $TABLE_INDEXES indexes (every update sets an indexed column: none is HOT); targets $([ "$VACUUM_TARGET" = 1 ] && echo "vacuumed (FREEZE, ANALYZE)" || echo "as the replicator left them (not vacuumed)") before the backlog;"
    [ "$NATIVE" = 1 ] && echo "native's target: $([ "$NATIVE_INDEXES_FIRST" = 1 ] && echo "keys and indexes created before its rows were loaded" || echo "rows loaded, then keys and indexes built (as walshuttle bootstrap does)");"
    echo "repository HEAD $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')."
    echo "1-minute load average at the start of the run: $LOAD_START.$([ "$EXPLAIN" = 1 ] && echo " **--explain: auto_explain on the target, times are not figures.**")"
    echo "Clock: from \`walshuttle run\` starting (native: \`ALTER SUBSCRIPTION … ENABLE\`) until the target shows the marker transaction written after the backlog."
    echo "Binaries:$BIN_INFO"
    echo
    echo "| tool | round | drain (s) | / native same round | load at start → end | consistent | walshuttle CPU (s) |"
    echo "|---|---|---|---|---|---|---|"
    awk -F'\t' '{ r[NR] = $0; tool[NR] = $1; round[NR] = $2; s[NR] = $3; if ($1 == "native") nat[$2] = $3 }
        END { for (i = 1; i <= NR; i++) {
                  split(r[i], f, "\t")
                  ratio = (nat[round[i]] != "" && s[i] != "" && tool[i] != "native") ? sprintf("%.2f", s[i] / nat[round[i]]) : ""
                  printf "| %s | %s | %s | %s | %s → %s | %s | %s |\n", f[1], f[2], f[3], ratio, f[4], f[5], f[6], f[7] } }' "$RESULTS_TSV"
} >"$RESULTS/$OUT.md"
cat "$RESULTS/$OUT.md"
[ "$FAILED" = 0 ] || exit 1
exit 0
}
