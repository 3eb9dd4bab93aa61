#!/usr/bin/env bash
# pgrelay benchmark: pgbench -S against PostgreSQL directly, through pgrelay, through PgBouncer and
# through HAProxy -- all four in front of ONE throwaway PostgreSQL 15 that this script starts.
#
#   make bench                                  (installs pgbouncer/haproxy, builds, runs this)
#   BENCH_SECONDS=2 BENCH_REPEAT=1 bash tests/bench/bench.sh      quick smoke run
#
# What is measured
#   * pgbench -S (select only) with -M simple and -M prepared at 1, 16 and 64 clients, plus
#     -S -M simple -C (a new connection for every transaction) at 16 clients.
#     Runs are interleaved (direct, pgrelay, pgbouncer, haproxy, direct, ...) and repeated
#     BENCH_REPEAT times; the table shows the median TPS, min-max, the ratio to direct's median,
#     the CPU the proxy used (utime+stime of all its processes -- for pgrelay the master and all
#     workers -- divided by wall time, i.e. in cores), the proxy CPU time per transaction, and
#     the median over runs of each run's p50 and p99 transaction latency (pgbench -l logs).
#   * Memory per idle session: each proxy is started fresh, BENCH_IDLE_SESSIONS sessions are opened
#     through it (each runs one SELECT 1 and then stays idle), and the growth of the summed PSS of
#     all proxy processes (from /proc/<pid>/smaps_rollup) is divided by the number of sessions.
#
# Environment (all optional)
#   BENCH_SECONDS=10          length of each pgbench run
#   BENCH_REPEAT=3            runs per target and case
#   BENCH_CLIENTS="1 16 64"   client counts for -M simple / -M prepared
#   BENCH_CONNECT_CLIENTS=16  client counts for the -C case ("" to skip)
#   BENCH_SCALE=10            pgbench -i scale factor
#   BENCH_IDLE_SESSIONS=1000  idle sessions for the memory measurement (0 to skip)
#   BENCH_TARGETS="direct pgrelay pgbouncer haproxy"   (also: pgrelay_base, see PGRELAY_BASE_BIN;
#                             and the TLS targets, reached with sslmode=require: direct_tls
#                             (PostgreSQL with ssl = on), pgrelay_tls (pgrelay terminating TLS,
#                             node in clear), pgrelay_tls_node (TLS to the node too),
#                             pgbouncer_tls (client_tls_sslmode = require); `make bench-tls`)
#   BENCH_PGRELAY_WORKERS     pgrelay workers (default: number of CPUs)
#   BENCH_PGRELAY_LOG_LEVEL=warning
#   BENCH_PGRELAY_AGENT=on     pgrelay's `agent` setting (on = as deployed: the master also runs
#                             pgrelay-agent, whose CPU and memory count as pgrelay's; off = static roles)
#   BENCH_HAPROXY_THREADS     haproxy nbthread (default: number of CPUs)
#   BENCH_OUT=./bench-results.txt   where the final tables are written as well
#   BENCH_PGRELAY_AGENT_KEYS   extra [agent] lines for target pgrelay, ';'-separated, e.g.
#                             "plan_sample_rate = 0.01" (query plans: pgrelay-agent(8))
#   BENCH_PGRELAY_BASE_AGENT_KEYS  the same for target pgrelay_base: one build, two settings
#   PGRELAY_BIN=<repo>/bin/pgrelay
#   PGRELAY_BASE_BIN          another build of pgrelay (with its pgrelay-agent beside it), run as
#                             target pgrelay_base with the same settings: before/after a change,
#                             interleaved in one run, e.g. BENCH_TARGETS="direct pgrelay_base pgrelay"
#
# Every process started here (PostgreSQL, proxies, pgbench) is stopped and the temporary directory
# removed on exit, including on failure and Ctrl-C.  Needs root (PostgreSQL and PgBouncer are run as
# the `postgres` user) or, when not root, runs everything as the current user.

set -euo pipefail

# ---------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PGBIN=/usr/lib/postgresql/15/bin
PY=/usr/bin/python3
NCPU=$(nproc)
CLK_TCK=$(getconf CLK_TCK)

BENCH_SECONDS=${BENCH_SECONDS:-10}
BENCH_REPEAT=${BENCH_REPEAT:-3}
BENCH_CLIENTS=${BENCH_CLIENTS:-"1 16 64"}
BENCH_CONNECT_CLIENTS=${BENCH_CONNECT_CLIENTS-16}
BENCH_SCALE=${BENCH_SCALE:-10}
BENCH_IDLE_SESSIONS=${BENCH_IDLE_SESSIONS:-1000}
BENCH_TARGETS=${BENCH_TARGETS:-"direct pgrelay pgbouncer haproxy"}
BENCH_PGRELAY_WORKERS=${BENCH_PGRELAY_WORKERS:-$NCPU}
BENCH_PGRELAY_LOG_LEVEL=${BENCH_PGRELAY_LOG_LEVEL:-warning}
BENCH_PGRELAY_AGENT=${BENCH_PGRELAY_AGENT:-on}
BENCH_HAPROXY_THREADS=${BENCH_HAPROXY_THREADS:-$NCPU}
BENCH_OUT=${BENCH_OUT:-bench-results.txt}
PGRELAY_BIN=${PGRELAY_BIN:-$REPO/bin/pgrelay}
PGRELAY_BASE_BIN=${PGRELAY_BASE_BIN:-}
BENCH_PGRELAY_AGENT_KEYS=${BENCH_PGRELAY_AGENT_KEYS:-}
BENCH_PGRELAY_BASE_AGENT_KEYS=${BENCH_PGRELAY_BASE_AGENT_KEYS:-}

# Absolute paths: the script changes into its temporary directory.
[[ $BENCH_OUT == /* ]] || BENCH_OUT=$PWD/$BENCH_OUT
[[ $PGRELAY_BIN == /* ]] || PGRELAY_BIN=$PWD/$PGRELAY_BIN
[[ -z $PGRELAY_BASE_BIN || $PGRELAY_BASE_BIN == /* ]] || PGRELAY_BASE_BIN=$PWD/$PGRELAY_BASE_BIN

read -r -a TARGETS <<<"$BENCH_TARGETS"
DBNAME=bench

# libpq settings shared by pgbench, psql and psycopg: plain TCP on loopback for every target
# (TLS targets: sslmode=require, set per run by sslmode_for).
export PGSSLMODE=disable PGGSSENCMODE=disable PGCONNECT_TIMEOUT=10 PGUSER=postgres
TLSDIR=""               # certificate and key of the TLS targets (and of PostgreSQL's ssl = on)

# State used by cleanup().
WORK=""                 # temporary directory
PGDATA=""
CHILD=""                # pgbench / python process currently running
declare -A PORT=()      # target -> TCP port
declare -A PID=()       # proxy target -> pid of its (master) process
declare -A LOGF=()      # proxy target -> log file
FAILURES=0
HAVE_AGENT=0            # bin/pgrelay-agent exists (pgrelay has the `agent` setting)

# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Run a command as the postgres user (PostgreSQL and PgBouncer refuse to run as root).
# "${AS_PG[@]}" cmd & -- setpriv execs the command, so $! is the command's own pid (a function run
# in the background would add a bash subshell in between).
if [[ $(id -u) -eq 0 ]]; then
    PGOS_USER=postgres
    AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
else
    PGOS_USER=$(id -un)
    AS_PG=(env)
fi
as_pg() { "${AS_PG[@]}" "$@"; }

# TLS targets (their names say _tls) are reached with sslmode=require; the others in clear.
is_tls() { [[ $1 == *_tls* ]]; }
sslmode_for() { if is_tls "$1"; then echo require; else echo disable; fi; }
any_tls_target() {
    local t
    for t in "${TARGETS[@]}"; do if is_tls "$t"; then return 0; fi; done
    return 1
}

# A self-signed certificate for 127.0.0.1 (sslmode=require encrypts without checking it).
setup_tls() {
    TLSDIR=$WORK/tls
    mkdir -p "$TLSDIR"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1 \
        -keyout "$TLSDIR/server.key" -out "$TLSDIR/server.crt" >/dev/null 2>&1 ||
        die "openssl could not make a certificate"
    chmod 0755 "$TLSDIR"
    chmod 0600 "$TLSDIR/server.key"
    chown "$PGOS_USER" "$TLSDIR/server.key" "$TLSDIR/server.crt"
}

# A process is alive if it exists and is not a zombie.
alive() {
    local st
    st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    st=${st##*) }
    [[ ${st:0:1} != Z ]]
}

# Print a pid and all its descendants (one per line).
proc_tree() {
    local p
    echo "$1"
    for p in $(pgrep -P "$1" || true); do proc_tree "$p"; done
}

# Sum of utime+stime+cutime+cstime (clock ticks) of the given pids.  Including the children's
# times means a worker that exits and is reaped by the pgrelay master during a run stays counted.
cpu_ticks() {
    local total=0 pid st
    local -a f
    for pid in "$@"; do
        st=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        read -r -a f <<<"${st##*) }"         # f[0] is field 3 (state); utime is field 14
        total=$((total + f[11] + f[12] + f[13] + f[14]))
    done
    echo "$total"
}

# Pick a free TCP port on 127.0.0.1 that is not already handed out to another target.
free_port() {
    "$PY" - "${PORT[@]}" <<'EOF'
import random, socket, sys
taken = {int(p) for p in sys.argv[1:]}
for _ in range(1000):
    port = random.randint(20000, 32000)       # below the ephemeral range (32768-60999)
    if port in taken:
        continue
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    sys.exit(0)
sys.exit("no free port")
EOF
}

# Wait until something accepts TCP connections on 127.0.0.1:$1 (pid $2 must stay alive).
wait_port() {
    local port=$1 pid=$2 i
    for ((i = 0; i < 150; i++)); do
        alive "$pid" || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

# psql against a target's port.
psql_at() {
    local port=$1
    shift
    psql -X -q -h 127.0.0.1 -p "$port" -d "$DBNAME" -v ON_ERROR_STOP=1 -At "$@"
}

# Number of client backends on the server (other than the one asking).
pg_backends() {
    psql_at "${PORT[direct]}" -c "SELECT count(*) FROM pg_stat_activity
        WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
}

# ---------------------------------------------------------------------------------------------------
# Cleanup: stop everything we started, remove the temporary directory.
# ---------------------------------------------------------------------------------------------------

cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    set +e
    if [[ -n $CHILD ]]; then
        kill -TERM "$CHILD" 2>/dev/null
        wait "$CHILD" 2>/dev/null
    fi
    local t
    for t in "${!PID[@]}"; do stop_proxy "$t"; done
    stop_postgres
    [[ -n $WORK && -d $WORK ]] && rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM HUP

# ---------------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------------

# initdb + configuration + start + pgbench -i.
setup_postgres() {
    PGDATA=$WORK/pg/data
    PORT[direct]=$(free_port)
    PORT[direct_tls]=${PORT[direct]}
    log "initdb in $PGDATA (port ${PORT[direct]})"
    as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --no-sync \
        >"$WORK/pg/initdb.log" 2>&1 || { cat "$WORK/pg/initdb.log" >&2; die "initdb failed"; }
    cat >>"$PGDATA/postgresql.conf" <<EOF

# --- pgrelay benchmark ---
listen_addresses = '127.0.0.1'
port = ${PORT[direct]}
unix_socket_directories = '$WORK/pg'
max_connections = $PG_MAX_CONN
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
log_connections = off
EOF
    if [[ -n $TLSDIR ]]; then
        # direct_tls and pgrelay_tls_node reach it over TLS; the others still in clear
        cp "$TLSDIR/server.crt" "$TLSDIR/server.key" "$PGDATA/"
        chown "$PGOS_USER" "$PGDATA/server.crt" "$PGDATA/server.key"
        printf "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n" \
            >>"$PGDATA/postgresql.conf"
    fi
    start_postgres "$PG_MAX_CONN"
    psql -X -q -h 127.0.0.1 -p "${PORT[direct]}" -d postgres -c "CREATE DATABASE $DBNAME"
    log "pgbench -i -s $BENCH_SCALE"
    pgbench -i -s "$BENCH_SCALE" -h 127.0.0.1 -p "${PORT[direct]}" "$DBNAME" \
        >"$WORK/pgbench-init.log" 2>&1 || { cat "$WORK/pgbench-init.log" >&2; die "pgbench -i failed"; }
}

# start_postgres MAX_CONNECTIONS
start_postgres() {
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$WORK/pg/postgres.log" -w -t 60 \
        -o "-c max_connections=$1" start >/dev/null ||
        { tail -n 30 "$WORK/pg/postgres.log" >&2; die "PostgreSQL did not start"; }
}

# Stop PostgreSQL if it runs: fast, then immediate, then SIGKILL.
stop_postgres() {
    [[ -n $PGDATA && -f $PGDATA/postmaster.pid ]] || return 0
    local pmpid
    pmpid=$(head -n 1 "$PGDATA/postmaster.pid" 2>/dev/null || true)
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 30 stop >/dev/null 2>&1 ||
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w -t 10 stop >/dev/null 2>&1 ||
        { [[ -n $pmpid ]] && kill -KILL "$pmpid" 2>/dev/null; }
    return 0
}

# ---------------------------------------------------------------------------------------------------
# Proxies.  Each start_* writes a config into $WORK/<target>/, starts the proxy in the foreground
# as a background job and records its pid; start_proxy waits until it relays a query.
# ---------------------------------------------------------------------------------------------------

start_pgrelay() { start_pgrelay_as pgrelay "$PGRELAY_BIN"; }
start_pgrelay_base() { start_pgrelay_as pgrelay_base "$PGRELAY_BASE_BIN"; }
start_pgrelay_tls() {
    start_pgrelay_as pgrelay_tls "$PGRELAY_BIN" "client_tls_mode = require
client_tls_cert_file = $TLSDIR/server.crt
client_tls_key_file = $TLSDIR/server.key"
}
start_pgrelay_tls_node() {
    start_pgrelay_as pgrelay_tls_node "$PGRELAY_BIN" "client_tls_mode = require
client_tls_cert_file = $TLSDIR/server.crt
client_tls_key_file = $TLSDIR/server.key
server_tls_mode = require"
}

# start_pgrelay_as TARGET BINARY [MORE [pgrelay] LINES]
start_pgrelay_as() {
    local t=$1 bin=$2 more=${3:-}
    local dir=$WORK/$t
    mkdir -p "$dir"
    cat >"$dir/pgrelay.ini" <<EOF
[pgrelay]
listen_addr = 127.0.0.1
listen_port = ${PORT[$t]}
workers = $BENCH_PGRELAY_WORKERS
max_client_conn = $PROXY_MAX_CLIENTS
shutdown_timeout = 5s
log_level = $BENCH_PGRELAY_LOG_LEVEL
admin_socket = $dir/admin.sock
$(if ((HAVE_AGENT)); then echo "agent = $BENCH_PGRELAY_AGENT"; fi)
$more

[node.pg1]
host = 127.0.0.1
port = ${PORT[direct]}
role = primary
EOF
    local keys=$BENCH_PGRELAY_AGENT_KEYS
    [[ $t == pgrelay_base ]] && keys=$BENCH_PGRELAY_BASE_AGENT_KEYS
    if [[ -n $keys ]]; then
        printf '\n[agent]\n%s\n' "${keys//;/$'\n'}" >>"$dir/pgrelay.ini"
    fi
    "$bin" -t -c "$dir/pgrelay.ini" >>"${LOGF[$t]}" 2>&1 ||
        { cat "${LOGF[$t]}" >&2; die "$t rejected its config"; }
    "$bin" -c "$dir/pgrelay.ini" >>"${LOGF[$t]}" 2>&1 &
    PID[$t]=$!
}

# PgBouncer is single-threaded (one process, one event loop); session pooling with a pool large
# enough that no client ever waits for a server connection.
start_pgbouncer() { start_pgbouncer_as pgbouncer ""; }
start_pgbouncer_tls() {
    start_pgbouncer_as pgbouncer_tls "client_tls_sslmode = require
client_tls_cert_file = $TLSDIR/server.crt
client_tls_key_file = $TLSDIR/server.key"
}

# start_pgbouncer_as TARGET [MORE [pgbouncer] LINES]
start_pgbouncer_as() {
    local t=$1 more=$2
    local dir=$WORK/$t
    mkdir -p "$dir"
    echo '"postgres" ""' >"$dir/userlist.txt"
    cat >"$dir/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=${PORT[direct]}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = ${PORT[$t]}
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = session
max_client_conn = $PROXY_MAX_CLIENTS
default_pool_size = $PROXY_MAX_CLIENTS
max_db_connections = 0
max_user_connections = 0
log_connections = 0
log_disconnections = 0
log_stats = 0
ignore_startup_parameters = extra_float_digits,options
$more
EOF
    chown -R "$PGOS_USER" "$dir"
    "${AS_PG[@]}" /usr/sbin/pgbouncer "$dir/pgbouncer.ini" >>"${LOGF[$t]}" 2>&1 &
    PID[$t]=$!
}

# HAProxy as a plain TCP relay, one process with nbthread threads.
start_haproxy() {
    local dir=$WORK/haproxy
    mkdir -p "$dir"
    cat >"$dir/haproxy.cfg" <<EOF
global
    nbthread $BENCH_HAPROXY_THREADS
    maxconn $((PROXY_MAX_CLIENTS * 2))

defaults
    mode tcp
    maxconn $PROXY_MAX_CLIENTS
    timeout connect 10s
    timeout client 1h
    timeout server 1h

frontend pg_in
    bind 127.0.0.1:${PORT[haproxy]}
    default_backend pg_out

backend pg_out
    server pg1 127.0.0.1:${PORT[direct]}
EOF
    haproxy -c -q -f "$dir/haproxy.cfg" >>"${LOGF[haproxy]}" 2>&1 ||
        { cat "${LOGF[haproxy]}" >&2; die "haproxy rejected its config"; }
    haproxy -db -f "$dir/haproxy.cfg" >>"${LOGF[haproxy]}" 2>&1 &
    PID[haproxy]=$!
}

# start_proxy TARGET: start it and wait until a query goes through it.
start_proxy() {
    local t=$1
    [[ -n ${PORT[$t]:-} ]] || PORT[$t]=$(free_port)
    LOGF[$t]=$WORK/$t.log
    "start_$t"
    if ! wait_port "${PORT[$t]}" "${PID[$t]}"; then
        tail -n 30 "${LOGF[$t]}" >&2
        die "$t did not start listening on port ${PORT[$t]}"
    fi
    # A query must go through (retried for 10 s: pgrelay's agent may need a first probe).
    local out="" i
    for ((i = 0; i < 20; i++)); do
        out=$(PGSSLMODE=$(sslmode_for "$t") psql_at "${PORT[$t]}" -c "SELECT 1" 2>&1) || true
        if [[ $out == 1 ]]; then break; fi
        sleep 0.5
    done
    if [[ $out != 1 ]]; then
        log "$t: SELECT 1 through port ${PORT[$t]} failed: $out"
        tail -n 30 "${LOGF[$t]}" >&2
        die "$t does not relay"
    fi
    log "$t running: pid ${PID[$t]}, port ${PORT[$t]}, processes: $(proc_tree "${PID[$t]}" | wc -l)"
}

# stop_proxy TARGET: SIGTERM to the main process, SIGKILL to whatever of its tree is left after 10 s.
stop_proxy() {
    local t=$1 pid=${PID[$1]:-} p i
    [[ -n $pid ]] || return 0
    local -a tree
    mapfile -t tree < <(proc_tree "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        local left=0
        for p in "${tree[@]}"; do
            if alive "$p"; then left=1; fi
        done
        if ((left == 0)); then break; fi
        sleep 0.1
    done
    for p in "${tree[@]}"; do
        if alive "$p"; then kill -KILL "$p" 2>/dev/null || true; fi
    done
    wait "$pid" 2>/dev/null || true
    unset "PID[$t]"
}

# ---------------------------------------------------------------------------------------------------
# Throughput runs
# ---------------------------------------------------------------------------------------------------

# Cases: "key|mode|clients|connect(0/1)|description"
build_cases() {
    CASES=()
    local mode c plural
    for mode in simple prepared; do
        for c in $BENCH_CLIENTS; do
            plural=s
            if ((c == 1)); then plural=""; fi
            CASES+=("S-$mode-$c|$mode|$c|0|pgbench -S -M $mode, $c client$plural (-j $(threads_for "$c"))")
        done
    done
    for c in $BENCH_CONNECT_CLIENTS; do
        CASES+=("S-simple-C-$c|simple|$c|1|pgbench -S -M simple -C (new connection per transaction), $c clients (-j $(threads_for "$c"))")
    done
    : >"$WORK/cases.tsv"
    local cs key desc
    for cs in "${CASES[@]}"; do
        IFS='|' read -r key _ _ _ desc <<<"$cs"
        printf '%s\t%s, %s x %ss\n' "$key" "$desc" "$BENCH_REPEAT" "$BENCH_SECONDS" >>"$WORK/cases.tsv"
    done
}

# pgbench threads: one per CPU, but not more than clients.
threads_for() { echo $(($1 < NCPU ? $1 : NCPU)); }

# run_pgbench PORT MODE CLIENTS CONNECT SECONDS OUTFILE -- returns pgbench's exit status.
run_pgbench() {
    local port=$1 mode=$2 c=$3 connect=$4 secs=$5 out=$6 rc=0
    local -a args=(-h 127.0.0.1 -p "$port" -n -S -M "$mode" -c "$c" -j "$(threads_for "$c")" -T "$secs")
    if ((connect)); then args+=(-C); fi
    # Every transaction's latency, for p50/p99 (latency_percentiles reads and removes the files).
    args+=(-l --log-prefix "$out.lat")
    # Background + wait, so that a signal to this script is handled at once.
    pgbench "${args[@]}" "$DBNAME" >"$out" 2>&1 &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    return "$rc"
}

# latency_percentiles OUTFILE: "p50 p99" in milliseconds of the transactions pgbench logged
# for that run ("-1 -1" when none); removes the per-transaction logs.
latency_percentiles() {
    "$PY" - "$1".lat* <<'EOF'
import math, os, sys
lat = []
for path in sys.argv[1:]:
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    lat.append(int(fields[2]))  # microseconds
        os.unlink(path)
    except (OSError, ValueError):
        pass
lat.sort()
def q(p):
    return lat[max(0, math.ceil(p * len(lat)) - 1)] / 1000.0
print(f"{q(0.5):.3f} {q(0.99):.3f}" if lat else "-1 -1")
EOF
}

# measure TARGET CASE RUN: one pgbench run, appends a line to runs.tsv.
measure() {
    local t=$1 cs=$2 run=$3 key mode c connect
    IFS='|' read -r key mode c connect _ <<<"$cs"
    local out=$WORK/out/$key.$t.$run.txt rc=0 root=${PID[$t]:-}
    local -a pids=()
    local proxied=1
    if [[ $t == direct || $t == direct_tls ]]; then proxied=0; fi
    if ((proxied)); then
        if ! alive "$root"; then
            echo "$t process $root is not running" >"$out"
            record_failure "$t" "$key" "$run" "$out"
            return 0
        fi
        mapfile -t pids < <(proc_tree "$root")
    fi
    local t0 t1 c0 c1 ticks=-1
    c0=$(cpu_ticks "${pids[@]}")
    t0=$(date +%s%N)
    PGSSLMODE=$(sslmode_for "$t") run_pgbench "${PORT[$t]}" "$mode" "$c" "$connect" \
        "$BENCH_SECONDS" "$out" || rc=$?
    t1=$(date +%s%N)
    if ((proxied)); then
        if ! alive "$root"; then
            echo "$t process $root exited during the run" >>"$out"
            record_failure "$t" "$key" "$run" "$out" "$rc"
            return 0
        fi
        mapfile -t pids < <(proc_tree "$root")     # same processes unless a worker was re-forked
        c1=$(cpu_ticks "${pids[@]}")
        ticks=$((c1 - c0))
    fi
    local tps txns wall p50 p99
    read -r p50 p99 < <(latency_percentiles "$out")
    tps=$(awk '/^tps = / {print $3; exit}' "$out")
    txns=$(awk -F': *' '/^number of transactions actually processed/ {split($2, a, "/"); print a[1]; exit}' "$out")
    wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}')
    if ((rc != 0)) || [[ -z $tps || -z $txns ]] || grep -q '^pgbench: error\|aborted' "$out"; then
        record_failure "$t" "$key" "$run" "$out" "$rc"
        return 0
    fi
    printf '%s\t%s\t%s\tok\t%s\t%s\t%s\t%s\t%s\t%s\n' "$key" "$t" "$run" "$tps" "$txns" "$ticks" "$wall" \
        "$p50" "$p99" >>"$WORK/runs.tsv"
    local cpu="-"
    if ((ticks >= 0)); then cpu=$(awk -v k="$ticks" -v hz="$CLK_TCK" -v w="$wall" 'BEGIN {printf "%.2f cores", k / hz / w}'); fi
    log "run $run/$BENCH_REPEAT  $(printf '%-16s %-9s' "$key" "$t") tps=$(printf '%.0f' "$tps")  proxy cpu=$cpu  p50=${p50}ms p99=${p99}ms"
}

# Remember a failed run (the pgbench output and the proxy's log tail go into the results).
record_failure() {
    local t=$1 key=$2 run=$3 out=$4 rc=${5:-}
    FAILURES=$((FAILURES + 1))
    printf '%s\t%s\t%s\tFAIL\t0\t0\t-1\t0\t-1\t-1\n' "$key" "$t" "$run" >>"$WORK/runs.tsv"
    {
        echo "--- FAILED: $t, $key, run $run${rc:+ (pgbench exit status $rc)}"
        echo "pgbench output (last 15 lines):"
        tail -n 15 "$out" | sed 's/^/  /'
        if [[ -n ${LOGF[$t]:-} && -f ${LOGF[$t]} ]]; then
            echo "$t log (last 20 lines):"
            tail -n 20 "${LOGF[$t]}" | sed 's/^/  /'
        fi
    } >>"$WORK/failures.txt"
    log "run $run/$BENCH_REPEAT  $(printf '%-16s %-9s' "$key" "$t") FAILED: $(grep -m1 -i 'error\|abort\|not running\|exited' "$out" || tail -n 1 "$out")"
}

throughput_phase() {
    local t cs run
    for t in "${TARGETS[@]}"; do
        if [[ $t != direct && $t != direct_tls ]]; then start_proxy "$t"; fi
    done
    # Warm-up (not recorded): fills PostgreSQL's caches and PgBouncer's pool.
    for t in "${TARGETS[@]}"; do
        log "warm-up $t"
        PGSSLMODE=$(sslmode_for "$t") run_pgbench "${PORT[$t]}" simple 64 0 2 "$WORK/out/warmup.$t.txt" ||
            log "warm-up through $t failed: $(tail -n 2 "$WORK/out/warmup.$t.txt" | tr '\n' ' ')"
    done
    for ((run = 1; run <= BENCH_REPEAT; run++)); do
        for cs in "${CASES[@]}"; do
            for t in "${TARGETS[@]}"; do measure "$t" "$cs" "$run"; done
        done
    done
    for t in "${TARGETS[@]}"; do
        if [[ $t != direct && $t != direct_tls ]]; then stop_proxy "$t"; fi
    done
}

# ---------------------------------------------------------------------------------------------------
# Memory per idle session
# ---------------------------------------------------------------------------------------------------

# Wait (up to 60 s) until PostgreSQL has no client backends left from the previous proxy.
wait_backends_gone() {
    local i n
    for ((i = 0; i < 120; i++)); do
        n=$(pg_backends) || n="?"
        if [[ $n == 0 ]]; then return 0; fi
        sleep 0.5
    done
    log "warning: still $n client backends on PostgreSQL"
}

memory_phase() {
    local t line rc
    # PostgreSQL needs a backend for each idle session (pgrelay and HAProxy relay 1:1; PgBouncer in
    # session mode binds a server connection once the session ran its SELECT 1).
    log "restarting PostgreSQL with max_connections=$PG_MAX_CONN_IDLE for the idle-session test"
    stop_postgres
    start_postgres "$PG_MAX_CONN_IDLE"
    : >"$WORK/memory.tsv"
    for t in "${TARGETS[@]}"; do
        if [[ $t == direct || $t == direct_tls ]]; then continue; fi
        start_proxy "$t"           # fresh process: nothing left over from the throughput runs
        log "memory: opening $BENCH_IDLE_SESSIONS idle sessions through $t"
        rc=0
        "$PY" "$HERE/idle_sessions.py" --pid "${PID[$t]}" --port "${PORT[$t]}" \
            --direct-port "${PORT[direct]}" --dbname "$DBNAME" --sessions "$BENCH_IDLE_SESSIONS" \
            --sslmode "$(sslmode_for "$t")" \
            >"$WORK/out/memory.$t.txt" 2>&1 &
        CHILD=$!
        wait "$CHILD" || rc=$?
        CHILD=""
        line=$(grep '^sessions=' "$WORK/out/memory.$t.txt" || true)
        if ((rc != 0)) || [[ -z $line ]]; then
            FAILURES=$((FAILURES + 1))
            printf '%s\tFAIL %s\n' "$t" "$(tail -n 1 "$WORK/out/memory.$t.txt")" >>"$WORK/memory.tsv"
            {
                echo "--- FAILED: $t, idle-session memory test (exit status $rc)"
                sed 's/^/  /' "$WORK/out/memory.$t.txt" | tail -n 15
                echo "$t log (last 20 lines):"
                tail -n 20 "${LOGF[$t]}" | sed 's/^/  /'
            } >>"$WORK/failures.txt"
            log "memory test through $t FAILED: $(tail -n 1 "$WORK/out/memory.$t.txt")"
        else
            printf '%s\t%s\n' "$t" "$line" >>"$WORK/memory.tsv"
            log "memory $t: $line"
        fi
        stop_proxy "$t"
        wait_backends_gone
    done
}

# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

write_report() {
    local pgrelay_version="-" t
    for t in "${TARGETS[@]}"; do
        if [[ $t == pgrelay* && $t != pgrelay_base ]]; then
            pgrelay_version=$("$PGRELAY_BIN" -V 2>&1 | head -n 1)
        fi
    done
    {
        echo "pgrelay benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $NCPU CPUs," \
            "$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), Linux $(uname -r)"
        echo "PostgreSQL $("$PGBIN/postgres" -V | awk '{print $3}') (shared_buffers=256MB, fsync=off," \
            "max_connections=$PG_MAX_CONN), pgbench -i -s $BENCH_SCALE; $(pgbench -V)"
        echo "pgrelay: $pgrelay_version, workers=$BENCH_PGRELAY_WORKERS$(if ((HAVE_AGENT)); then echo ", agent=$BENCH_PGRELAY_AGENT"; fi)"
        if [[ " ${TARGETS[*]} " == *" pgrelay_base "* ]]; then
            echo "pgrelay_base: $PGRELAY_BASE_BIN_ORIG, same settings as pgrelay (the build to compare with)"
        fi
        echo "PgBouncer: $(pgbouncer -V 2>&1 | head -n 1 | awk '{print $2}'), pool_mode=session," \
            "single-threaded (one process)"
        echo "HAProxy: $(haproxy -v 2>&1 | head -n 1 | awk '{print $3}'), mode tcp, nbthread=$BENCH_HAPROXY_THREADS"
        echo "load average before: $LOAD_BEFORE; after: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "Each run ${BENCH_SECONDS}s; $BENCH_REPEAT runs per target, interleaved (${TARGETS[*]}, repeat);" \
            "TCP over loopback, sslmode=disable$(if any_tls_target; then echo " (TLS targets: require)"; fi)."
        echo "pgbench, the proxy and PostgreSQL all share the same $NCPU CPUs, so proxy CPU is taken"
        echo "away from PostgreSQL and pgbench: TPS through a proxy is bounded by that, not by the network."
        echo "proxy CPU = utime+stime of all proxy processes (pgrelay: master, workers, agent) during the run"
        echo "divided by wall time, in cores; CPU us/txn = that CPU time per pgbench transaction."
        echo
        if any_tls_target; then
            echo "TLS targets (pgbench and psql with sslmode=require, a self-signed RSA 2048 certificate):"
            echo "direct_tls = PostgreSQL with ssl = on; pgrelay_tls = pgrelay terminating TLS, node in clear;"
            echo "pgrelay_tls_node = the same with server_tls_mode = require; pgbouncer_tls = PgBouncer"
            echo "client_tls_sslmode = require, server in clear. Their 'vs direct' is against direct_tls."
            echo
        fi
        "$PY" "$HERE/report.py" "$WORK" "$CLK_TCK" "${TARGETS[@]}"
        echo "Notes:"
        if [[ " ${TARGETS[*]} " == *" pgbouncer "* ]]; then
            echo "- PgBouncer is single-threaded: it can never use more than one core."
            if [[ -n $BENCH_CONNECT_CLIENTS ]]; then
                echo "- -C: PgBouncer (session pooling) hands each new client a pooled server connection, so no"
                echo "  PostgreSQL backend is started per transaction; pgrelay and HAProxy relay 1:1 and every"
                echo "  client connection starts a backend, like direct."
            fi
        fi
        echo "- Idle sessions: PSS/RSS is user-space memory of the proxy processes; kernel socket buffers are"
        echo "  not included. After its SELECT 1 every session holds a server connection through each proxy"
        echo "  (PG backends column); PostgreSQL runs with max_connections=$PG_MAX_CONN_IDLE for this test."
        if ((HAVE_AGENT)) && [[ $BENCH_PGRELAY_AGENT == on ]]; then
            echo "- pgrelay runs with agent = on (its default): pgrelay-agent keeps a monitoring connection"
            echo "  per node (one more PG backend) and probes each second; counted in pgrelay's CPU and memory."
        fi
        echo
        if [[ -s $WORK/failures.txt ]]; then
            echo "FAILURES: $FAILURES"
            cat "$WORK/failures.txt"
        fi
    } >"$WORK/report.txt"
    cp "$WORK/report.txt" "$BENCH_OUT"
    echo
    cat "$WORK/report.txt"
    log "results written to $BENCH_OUT"
}

# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------

check_requirements() {
    local t
    [[ -x $PGBIN/initdb && -x $PGBIN/pg_ctl ]] || die "PostgreSQL 15 not found in $PGBIN"
    command -v pgbench >/dev/null || die "pgbench not found (Debian: postgresql-contrib / postgresql-client)"
    command -v psql >/dev/null || die "psql not found"
    "$PY" -c 'import psycopg' 2>/dev/null || die "$PY has no psycopg (Debian: python3-psycopg)"
    if [[ $(id -u) -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || die "no postgres user (Debian: postgresql-15)"
    fi
    for t in "${TARGETS[@]}"; do
        case $t in
        direct) ;;
        pgrelay) [[ -x $PGRELAY_BIN ]] || die "$PGRELAY_BIN not found: run 'make' first" ;;
        direct_tls) ;;
        pgrelay_tls | pgrelay_tls_node) [[ -x $PGRELAY_BIN ]] || die "$PGRELAY_BIN not found: run 'make' first" ;;
        pgbouncer_tls) [[ -x /usr/sbin/pgbouncer ]] || die "pgbouncer not found: run 'make deps-bench'" ;;
        pgrelay_base) [[ -n $PGRELAY_BASE_BIN && -x $PGRELAY_BASE_BIN ]] ||
            die "target pgrelay_base needs PGRELAY_BASE_BIN, an executable pgrelay ('$PGRELAY_BASE_BIN')" ;;
        pgbouncer) [[ -x /usr/sbin/pgbouncer ]] || die "pgbouncer not found: run 'make deps-bench'" ;;
        haproxy) command -v haproxy >/dev/null || die "haproxy not found: run 'make deps-bench'" ;;
        *) die "unknown target '$t' in BENCH_TARGETS" ;;
        esac
    done
    [[ ${TARGETS[0]} == direct ]] || die "BENCH_TARGETS must start with 'direct' (it is the baseline)"
}

main() {
    check_requirements
    LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

    local max_clients=64 c
    for c in $BENCH_CLIENTS $BENCH_CONNECT_CLIENTS; do
        if ((c > max_clients)); then max_clients=$c; fi
    done
    # Throughput phase: the clients of the running target plus PgBouncer's idle pool.
    PG_MAX_CONN=$((2 * max_clients + 72 > 200 ? 2 * max_clients + 72 : 200))
    PG_MAX_CONN_IDLE=$((BENCH_IDLE_SESSIONS + 100 > PG_MAX_CONN ? BENCH_IDLE_SESSIONS + 100 : PG_MAX_CONN))
    PROXY_MAX_CLIENTS=$((BENCH_IDLE_SESSIONS + 100 > 2 * max_clients ? BENCH_IDLE_SESSIONS + 100 : 2 * max_clients))
    ((PROXY_MAX_CLIENTS >= 1100)) || PROXY_MAX_CLIENTS=1100

    WORK=$(mktemp -d /tmp/pgrelay-bench.XXXXXX)
    chmod 755 "$WORK"
    mkdir -p "$WORK/pg" "$WORK/out"
    chown "$PGOS_USER" "$WORK/pg"
    cd "$WORK"
    : >"$WORK/runs.tsv"
    # Run a private copy of pgrelay (and of pgrelay-agent, which the master starts from the directory
    # of its own binary): bin/ may be rebuilt while the benchmark runs.
    if [[ " ${TARGETS[*]} " == *" pgrelay "* || " ${TARGETS[*]} " == *" pgrelay_tls"* ]]; then
        mkdir -p "$WORK/bin"
        cp "$PGRELAY_BIN" "$WORK/bin/pgrelay"
        if [[ -x $(dirname "$PGRELAY_BIN")/pgrelay-agent ]]; then
            cp "$(dirname "$PGRELAY_BIN")/pgrelay-agent" "$WORK/bin/pgrelay-agent"
            HAVE_AGENT=1
        fi
        PGRELAY_BIN=$WORK/bin/pgrelay
    fi
    if [[ " ${TARGETS[*]} " == *" pgrelay_base "* ]]; then
        mkdir -p "$WORK/base-bin"
        cp "$PGRELAY_BASE_BIN" "$WORK/base-bin/pgrelay"
        if [[ -x $(dirname "$PGRELAY_BASE_BIN")/pgrelay-agent ]]; then
            cp "$(dirname "$PGRELAY_BASE_BIN")/pgrelay-agent" "$WORK/base-bin/pgrelay-agent"
        fi
        PGRELAY_BASE_BIN_ORIG=$PGRELAY_BASE_BIN
        PGRELAY_BASE_BIN=$WORK/base-bin/pgrelay
    fi

    if any_tls_target; then setup_tls; fi
    build_cases
    local n=$((${#CASES[@]} * ${#TARGETS[@]} * BENCH_REPEAT))
    log "$n runs of ${BENCH_SECONDS}s (${#CASES[@]} cases x ${#TARGETS[@]} targets x $BENCH_REPEAT)," \
        "about $(((n * (BENCH_SECONDS + 1) + 60) / 60)) min plus setup and the idle-session test"

    setup_postgres
    throughput_phase
    if ((BENCH_IDLE_SESSIONS > 0)) && ((${#TARGETS[@]} > 1)); then memory_phase; fi
    write_report
    if ((FAILURES > 0)); then
        log "$FAILURES run(s) failed, see FAILURES in the results"
        exit 1
    fi
}

main "$@"
