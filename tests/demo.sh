#!/usr/bin/env bash
# demo.sh - a throwaway PostgreSQL 15 primary and streaming replica with a fleet of two pgrelay
# proxies in front of them (write port and read-only port each), pgrelay-control with both
# proxies declared and its web UI, a short pgbench through the first proxy, and a look at the
# admin console.
#
#   bash tests/demo.sh          start everything, run pgbench, then wait for Ctrl-C and clean up
#   bash tests/demo.sh stop     stop a running demo (from another terminal) and clean up
#
# Everything lives in ./demo/ under the repository root: the primary (demo/pgdata), the replica
# (demo/replica), the control plane's store (demo/store, a cluster of its own: a switchover
# fences every database of the old primary), the configs (demo/pgrelay.ini, demo/pgrelay-b.ini,
# demo/control.ini), the admin token of the web UI (demo/admin-token), the logs
# (demo/pgrelay.log, demo/pgrelay-b.log, demo/control.log, demo/postgres.log) and the pid files.
# Stopping removes the clusters and the pid files and keeps the configs and the logs.
#
# Environment:
#   DEMO_SECONDS=N    stop by itself after N seconds (default when stdin is not a terminal, or
#                     CI is set: 5; otherwise run until Ctrl-C)
#   DEMO_PG_PORT      PostgreSQL port (default 15432)
#   DEMO_REPLICA_PORT replica port (default 15433)
#   DEMO_PORT         pgrelay write port (default 6432)
#   DEMO_READ_PORT    pgrelay read-only port (default 6433)
#   DEMO_PORT_B       the second proxy's write port (default 6442)
#   DEMO_READ_PORT_B  the second proxy's read-only port (default 6443)
#   DEMO_CONTROL_PORT pgrelay-control and its web UI (default 8432)
#   DEMO_STORE_PORT   the control plane's store (default 15434)
#   PGBIN             PostgreSQL 15 binaries (default /usr/lib/postgresql/15/bin)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEMO=$ROOT/demo
PGDATA=$DEMO/pgdata
REPLICA=$DEMO/replica
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
PGRELAY=$ROOT/bin/pgrelay
PG_PORT=${DEMO_PG_PORT:-15432}
RELAY_PORT=${DEMO_PORT:-6432}
READ_PORT=${DEMO_READ_PORT:-6433}
REPLICA_PORT=${DEMO_REPLICA_PORT:-15433}
RELAY_B_PORT=${DEMO_PORT_B:-6442}
READ_B_PORT=${DEMO_READ_PORT_B:-6443}
CONTROL_PORT=${DEMO_CONTROL_PORT:-8432}
STORE_PORT=${DEMO_STORE_PORT:-15434}
STORE=$DEMO/store
CONTROL=$ROOT/bin/pgrelay-control
CTL=$ROOT/bin/pgrelayctl
CONF_B=$DEMO/pgrelay-b.ini
RELAY_B_LOG=$DEMO/pgrelay-b.log
RELAY_B_PID=$DEMO/pgrelay-b.pid
CONTROL_CONF=$DEMO/control.ini
CONTROL_LOG=$DEMO/control.log
CONTROL_PID=$DEMO/control.pid
TOKEN_FILE=$DEMO/admin-token
HOST=127.0.0.1
CONF=$DEMO/pgrelay.ini
RELAY_LOG=$DEMO/pgrelay.log
RELAY_PID=$DEMO/pgrelay.pid
DEMO_PID=$DEMO/demo.pid
LOCK=$DEMO/.lock

# The client settings below are explicit; make sure none of the user's PG* variables get in.
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGSSLMODE PGOPTIONS PGPASSWORD \
      PGCONNECT_TIMEOUT PGTARGETSESSIONATTRS

say() { printf '==> %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

# PostgreSQL refuses to run as root: as root, run its programs as the postgres user.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Is this pid a running process (not gone, not a zombie waiting for its parent)?
alive() {
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "${st#Z}" = "$st" ]
}

# pid from a file when that process is alive (and, if given, its command name matches).
live_pid() {
    local file=$1 comm=${2:-} pid
    [ -s "$file" ] || return 1
    pid=$(head -n 1 "$file" 2>/dev/null | tr -dc 0-9)
    [ -n "$pid" ] && alive "$pid" || return 1
    if [ -n "$comm" ]; then
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
    fi
    echo "$pid"
}

# Is the demo script itself running (demo.pid names a live bash running demo.sh)?
demo_script_pid() {
    local pid
    pid=$(live_pid "$DEMO_PID") || return 1
    [ "$pid" != "$$" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'demo\.sh' || return 1
    echo "$pid"
}

port_busy() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

wait_gone() { # pid seconds
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        alive "$1" || return 0
        sleep 0.1
    done
    return 1
}

stop_pgrelay() { # [pidfile] [started-file] [label]
    local pidf=${1:-$RELAY_PID} started=${2:-$DEMO/pgrelay.started} label=${3:-pgrelay} pid kids
    pid=$(live_pid "$pidf" pgrelay) || pid=$(live_pid "$started" pgrelay) || {
        rm -f "$pidf" "$started"
        return 0
    }
    say "stopping $label (pid $pid)"
    kids=$(pgrep -P "$pid" || true)
    kill -INT "$pid" 2>/dev/null || true # fast shutdown: close sessions now
    if ! wait_gone "$pid" 10; then
        kill -QUIT "$pid" 2>/dev/null || true
        wait_gone "$pid" 3 || kill -KILL "$pid" 2>/dev/null || true
    fi
    for k in $kids; do
        if [[ "$(cat "/proc/$k/comm" 2>/dev/null)" == pgrelay* ]]; then # workers, agent
            kill -KILL "$k" 2>/dev/null || true
        fi
    done
    rm -f "$pidf" "$started"
}

stop_control() {
    local pid
    pid=$(live_pid "$CONTROL_PID" pgrelay-control) ||
        pid=$(live_pid "$DEMO/control.started" pgrelay-control) || {
        rm -f "$CONTROL_PID" "$DEMO/control.started"
        return 0
    }
    say "stopping pgrelay-control (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    wait_gone "$pid" 10 || kill -KILL "$pid" 2>/dev/null || true
    rm -f "$CONTROL_PID" "$DEMO/control.started"
}

stop_cluster() { # data-dir label
    local pid
    pid=$(live_pid "$1/postmaster.pid" postgres) || return 0
    say "stopping PostgreSQL $2 (pid $pid)"
    if ! (cd "$DEMO" && as_pg "$PGBIN/pg_ctl" -D "$1" -m fast -w -t 30 stop >/dev/null); then
        kill -QUIT "$pid" 2>/dev/null || true
        wait_gone "$pid" 5 || kill -KILL "$pid" 2>/dev/null || true
    fi
}

stop_postgres() {
    stop_cluster "$REPLICA" replica
    stop_cluster "$PGDATA" primary
    stop_cluster "$STORE" store
}

# Stop whatever a demo left running and remove its state; safe to call any number of times.
stop_all() {
    [ -d "$DEMO" ] || return 0
    (
        flock 9
        stop_pgrelay
        stop_pgrelay "$RELAY_B_PID" "$DEMO/pgrelay-b.started" "the second pgrelay"
        stop_control
        stop_postgres
        # The clusters and the pids go; configs and logs stay for a look afterwards.
        case $DEMO in */demo) rm -rf -- "$PGDATA" "$REPLICA" "$STORE" ;; esac
        rm -f "$DEMO/agent-a.state" "$DEMO/agent-b.state" "$DEMO/agent.state"
        rm -f "$DEMO/.s.PGSQL.$PG_PORT" "$DEMO/.s.PGSQL.$PG_PORT.lock" "$DEMO/admin.sock" \
            "$DEMO/.s.PGSQL.$REPLICA_PORT" "$DEMO/.s.PGSQL.$REPLICA_PORT.lock" \
            "$DEMO/admin-b.sock" "$DEMO/.s.PGSQL.$STORE_PORT" "$DEMO/.s.PGSQL.$STORE_PORT.lock"
        if [ "$(live_pid "$DEMO_PID" || true)" = "$$" ] || ! demo_script_pid >/dev/null; then
            rm -f "$DEMO_PID"
        fi
    ) 9>"$LOCK"
}

cmd_stop() {
    local pid
    if ! demo_script_pid >/dev/null && ! live_pid "$RELAY_PID" pgrelay >/dev/null &&
        ! live_pid "$RELAY_B_PID" pgrelay >/dev/null &&
        ! live_pid "$CONTROL_PID" pgrelay-control >/dev/null &&
        ! live_pid "$STORE/postmaster.pid" postgres >/dev/null &&
        ! live_pid "$PGDATA/postmaster.pid" postgres >/dev/null &&
        ! live_pid "$REPLICA/postmaster.pid" postgres >/dev/null; then
        [ -d "$DEMO" ] && stop_all
        say "no demo running"
        return 0
    fi
    if pid=$(demo_script_pid); then
        say "stopping the demo (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        wait_gone "$pid" 60 || printf 'demo: pid %s did not exit; cleaning up anyway\n' "$pid" >&2
    fi
    if [ -d "$DEMO" ]; then
        stop_all
        say "demo stopped; logs kept in $DEMO"
    else
        say "no demo to stop"
    fi
}

cleaned=0
cleanup() {
    local rc=$?
    [ "$cleaned" = 1 ] && return
    cleaned=1
    set +e
    trap '' INT TERM HUP
    echo
    stop_all
    say "done (logs: $RELAY_LOG, $DEMO/postgres.log)"
    exit "$rc"
}

# The control plane's store: a cluster of its own (a switchover fences every database of the
# old primary, so the store must not live there).
start_store() {
    say "initdb $STORE (the control plane's store, port $STORE_PORT)"
    (cd "$DEMO" && as_pg "$PGBIN/initdb" -D "$STORE" -U postgres -A trust -E UTF8 --no-locale \
        --no-sync --no-instructions >"$DEMO/initdb-store.log" 2>&1) ||
        { cat "$DEMO/initdb-store.log" >&2; die "initdb of the store failed"; }
    as_pg tee -a "$STORE/postgresql.conf" >/dev/null <<EOF

# tests/demo.sh: the control plane's throwaway store
port = $STORE_PORT
listen_addresses = '$HOST'
unix_socket_directories = '$DEMO'
fsync = off
EOF
    (cd "$DEMO" && as_pg "$PGBIN/pg_ctl" -D "$STORE" -l "$DEMO/store.log" -w -t 60 start \
        >/dev/null 2>&1) || { tail -n 20 "$DEMO/store.log" >&2; die "the store did not start"; }
    "$PGBIN/psql" -h "$HOST" -p "$STORE_PORT" -U postgres -X -q -d postgres \
        -c "CREATE DATABASE pgrelay_control" || die "cannot create the store database"
}

# pgrelayctl against the demo's control plane.
ctl() {
    PGRELAYCTL_ENDPOINT="http://$HOST:$CONTROL_PORT" PGRELAYCTL_TOKEN="$ADMIN_TOKEN" \
        PGRELAYCTL_DEPLOYMENT=demo "$CTL" "$@"
}

# pgrelay-control with deployment demo, fresh random tokens, both proxies declared.
start_control() {
    ADMIN_TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    AGENT_TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    (umask 077 && echo "$ADMIN_TOKEN" >"$TOKEN_FILE")
    (umask 077 && cat >"$CONTROL_CONF") <<EOF
; pgrelay-control demo configuration, written by tests/demo.sh
[control]
listen_addr = $HOST
listen_port = $CONTROL_PORT
store = host=$HOST port=$STORE_PORT dbname=pgrelay_control user=postgres
admin_tokens = $ADMIN_TOKEN
proxy_timeout = 5s
log_level = info

[deployment.demo]
token = $AGENT_TOKEN
EOF
    "$CONTROL" -t -c "$CONTROL_CONF" >/dev/null || die "pgrelay-control rejected $CONTROL_CONF"
    say "starting pgrelay-control on $HOST:$CONTROL_PORT (log: $CONTROL_LOG)"
    setsid "$CONTROL" -c "$CONTROL_CONF" -p "$CONTROL_PID" </dev/null >/dev/null \
        2>>"$CONTROL_LOG" &
    echo $! >"$DEMO/control.started"
    local i
    for ((i = 0; i < 100; i++)); do
        ctl show-deployments >/dev/null 2>&1 && break
        alive "$(cat "$DEMO/control.started")" ||
            { tail -n 20 "$CONTROL_LOG" >&2; die "pgrelay-control exited"; }
        sleep 0.1
    done
    [ "$i" -lt 100 ] || { tail -n 20 "$CONTROL_LOG" >&2; die "pgrelay-control does not answer"; }
    say "declaring the fleet's two proxies: pgrelayctl create-proxy proxy-a, proxy-b"
    { ctl create-proxy proxy-a && ctl create-proxy proxy-b; } >/dev/null ||
        die "pgrelayctl create-proxy failed"
}

write_relay_conf() { # file write-port read-port admin-socket agent-state-file
    (umask 077 && cat >"$1") <<EOF
; pgrelay demo configuration, written by tests/demo.sh: one of the two proxies of the fleet
; (on real hosts both run the same file, as 'pgrelayctl config apply' sends one to all)
[pgrelay]
listen_addr = $HOST
listen_port = $2
read_listen_port = $3
workers = 2
shutdown_timeout = 5s
log_level = info
admin_socket = $4

[agent]
health_interval = 500ms
state_file = $5

[control]
endpoint = http://$HOST:$CONTROL_PORT
token = $AGENT_TOKEN

[node.pg1]
host = $HOST
port = $PG_PORT
role = primary

[node.pg2]
host = $HOST
port = $REPLICA_PORT
role = replica
EOF
    "$PGRELAY" -t -c "$1" || die "pgrelay rejected $1"
}

start_relay() { # node-id conf pidfile started-file log port
    port_busy "$6" && die "port $6 is in use"
    say "starting pgrelay $1 on $HOST:$6 (2 workers, log: $5)"
    # Own session: Ctrl-C reaches this script, which then stops pgrelay and PostgreSQL in order.
    NODE_ID=$1 setsid "$PGRELAY" -c "$2" -p "$3" </dev/null >/dev/null 2>>"$5" &
    echo $! >"$4"
    # Ready: pgrelay writes its pidfile once it listens, and the port accepts connections.
    local i
    for ((i = 0; i < 100; i++)); do
        live_pid "$3" pgrelay >/dev/null && port_busy "$6" && break
        alive "$(cat "$4")" || { tail -n 20 "$5" >&2; die "pgrelay $1 exited"; }
        sleep 0.1
    done
    [ "$i" -lt 100 ] || { tail -n 20 "$5" >&2; die "pgrelay $1 is not listening"; }
}

cmd_start() {
    local pid

    [ -x "$PGRELAY" ] || die "$PGRELAY not found: run 'make' first"
    [ -x "$CONTROL" ] && [ -x "$CTL" ] || die "$CONTROL or $CTL not found: run 'make' first"
    for p in initdb pg_ctl postgres pgbench psql; do
        [ -x "$PGBIN/$p" ] || die "$PGBIN/$p not found: install PostgreSQL 15 ('make deps')"
    done
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        die "running as root needs a 'postgres' user to run PostgreSQL"
    fi

    mkdir -p "$DEMO"
    if pid=$(demo_script_pid); then
        die "a demo is already running (pid $pid); stop it with 'make demo-stop'"
    fi
    # Leftovers of a demo that was killed: stop them before the ports are checked.
    stop_all
    port_busy "$PG_PORT" && die "port $PG_PORT is in use (set DEMO_PG_PORT)"
    port_busy "$RELAY_PORT" && die "port $RELAY_PORT is in use (set DEMO_PORT)"
    port_busy "$READ_PORT" && die "port $READ_PORT is in use (set DEMO_READ_PORT)"
    port_busy "$REPLICA_PORT" && die "port $REPLICA_PORT is in use (set DEMO_REPLICA_PORT)"
    port_busy "$RELAY_B_PORT" && die "port $RELAY_B_PORT is in use (set DEMO_PORT_B)"
    port_busy "$READ_B_PORT" && die "port $READ_B_PORT is in use (set DEMO_READ_PORT_B)"
    port_busy "$CONTROL_PORT" && die "port $CONTROL_PORT is in use (set DEMO_CONTROL_PORT)"
    port_busy "$STORE_PORT" && die "port $STORE_PORT is in use (set DEMO_STORE_PORT)"

    echo $$ >"$DEMO_PID"
    trap cleanup EXIT
    trap 'exit 0' INT TERM HUP

    [ "$(id -u)" = 0 ] && chown postgres: "$DEMO"
    rm -f "$RELAY_LOG" "$RELAY_B_LOG" "$CONTROL_LOG" "$DEMO/postgres.log" "$DEMO/store.log"

    say "initdb $PGDATA (PostgreSQL 15, port $PG_PORT, trust on $HOST)"
    (cd "$DEMO" && as_pg "$PGBIN/initdb" -D "$PGDATA" -U postgres -A trust -E UTF8 --no-locale \
        --no-sync --no-instructions >"$DEMO/initdb.log" 2>&1) ||
        { cat "$DEMO/initdb.log" >&2; die "initdb failed"; }
    as_pg tee "$PGDATA/pg_hba.conf" >/dev/null <<EOF
# throwaway demo cluster: trust, loopback only
local all all trust
host  all all $HOST/32 trust
host  replication all $HOST/32 trust
EOF
    as_pg tee -a "$PGDATA/postgresql.conf" >/dev/null <<EOF

# tests/demo.sh: throwaway cluster, durability off for speed
port = $PG_PORT
listen_addresses = '$HOST'
unix_socket_directories = '$DEMO'
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    say "starting PostgreSQL"
    # $PG_PORT lies in Linux's ephemeral port range: an outgoing connection of some other
    # program (or its TIME_WAIT, up to 60 s) can hold it. Wait for it rather than fail.
    local try
    for ((try = 1; ; try++)); do
        (cd "$DEMO" && as_pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$DEMO/postgres.log" -w -t 60 start \
            >/dev/null 2>&1) && break
        if [ "$try" -lt 75 ] && tail -n 5 "$DEMO/postgres.log" | grep -q 'Address already in use'
        then
            [ "$try" = 1 ] && say "port $PG_PORT is held by another connection; waiting for it"
            sleep 1
            continue
        fi
        tail -n 20 "$DEMO/postgres.log" >&2
        die "PostgreSQL did not start"
    done

    say "streaming replica: pg_basebackup into $REPLICA (port $REPLICA_PORT)"
    (cd "$DEMO" && as_pg "$PGBIN/pg_basebackup" -h "$HOST" -p "$PG_PORT" -U postgres -D "$REPLICA" \
        -R -X stream >"$DEMO/basebackup.log" 2>&1) ||
        { cat "$DEMO/basebackup.log" >&2; die "pg_basebackup failed"; }
    (cd "$DEMO" && as_pg "$PGBIN/pg_ctl" -D "$REPLICA" -l "$DEMO/replica.log" -w -t 60 \
        -o "-p $REPLICA_PORT" start >/dev/null 2>&1) ||
        { tail -n 20 "$DEMO/replica.log" >&2; die "the replica did not start"; }

    start_store
    start_control

    write_relay_conf "$CONF" "$RELAY_PORT" "$READ_PORT" "$DEMO/admin.sock" "$DEMO/agent-a.state"
    write_relay_conf "$CONF_B" "$RELAY_B_PORT" "$READ_B_PORT" "$DEMO/admin-b.sock" \
        "$DEMO/agent-b.state"
    start_relay proxy-a "$CONF" "$RELAY_PID" "$DEMO/pgrelay.started" "$RELAY_LOG" "$RELAY_PORT"
    start_relay proxy-b "$CONF_B" "$RELAY_B_PID" "$DEMO/pgrelay-b.started" "$RELAY_B_LOG" \
        "$RELAY_B_PORT"
    local i
    for ((i = 0; i < 100; i++)); do
        ctl -o json show-deployments | grep -Eq '"live": ?2' && break
        sleep 0.1
    done
    [ "$i" -lt 100 ] || { tail -n 20 "$CONTROL_LOG" >&2; die "the proxies did not register"; }
    ctl show-proxies

    local conn=(-h "$HOST" -p "$RELAY_PORT" -U postgres)
    "$PGBIN/psql" "${conn[@]}" -X -At -P pager=off -d postgres \
        -c "select 'through pgrelay: ' || split_part(version(), ',', 1)"

    say "pgbench -i -s 5 (through pgrelay)"
    PGOPTIONS="-c client_min_messages=warning" "$PGBIN/pgbench" "${conn[@]}" -i -q -s 5 postgres 2>&1
    say "pgbench -c 8 -j 2 -T 5 -S (through pgrelay)"
    "$PGBIN/pgbench" "${conn[@]}" -c 8 -j 2 -T 5 -S postgres 2>&1
    say "read-only port $READ_PORT goes to the replica:"
    "$PGBIN/psql" -h "$HOST" -p "$READ_PORT" -U postgres -X -At -P pager=off -d postgres \
        -c "select 'read port -> server port ' || inet_server_port() || ', in recovery: ' || pg_is_in_recovery()"
    say "admin console: echo \"show nodes\" | socat - UNIX-CONNECT:$DEMO/admin.sock"
    echo "show nodes" | socat - "UNIX-CONNECT:$DEMO/admin.sock"

    local secs=${DEMO_SECONDS:-}
    if [ -z "$secs" ] && { [ ! -t 0 ] || [ -n "${CI:-}" ]; }; then
        secs=5
    fi
    echo
    echo "pgrelay is running. Connect with:"
    echo "    psql -h $HOST -p $RELAY_PORT -U postgres      # write port -> the leader"
    echo "    psql -h $HOST -p $READ_PORT -U postgres      # read-only port -> the replica"
    echo "    pgbench -h $HOST -p $RELAY_PORT -U postgres -c 8 -T 10 -S postgres"
    echo "Look inside with the admin console:"
    echo "    echo \"show info; show clients\" | socat - UNIX-CONNECT:$DEMO/admin.sock"
    echo "    echo \"help\" | socat - UNIX-CONNECT:$DEMO/admin.sock"
    echo "Logs: $RELAY_LOG, $RELAY_B_LOG, $CONTROL_LOG"
    echo "The second proxy of the fleet: psql -h $HOST -p $RELAY_B_PORT -U postgres"
    echo
    echo "Web UI of the control plane: http://$HOST:$CONTROL_PORT/"
    echo "    admin token: $ADMIN_TOKEN   (also in $TOKEN_FILE)"
    echo "    from another machine: ssh -L $CONTROL_PORT:$HOST:$CONTROL_PORT this-host"
    echo "CLI: PGRELAYCTL_ENDPOINT=http://$HOST:$CONTROL_PORT PGRELAYCTL_TOKEN=\$(cat $TOKEN_FILE) \\"
    echo "       $CTL show-proxies"
    if [ -n "$secs" ]; then
        echo "Stopping in ${secs}s (DEMO_SECONDS)."
    else
        echo "Press Ctrl-C to stop (or run 'make demo-stop' in another terminal)."
    fi

    local start=$SECONDS
    while :; do
        if [ -n "$secs" ] && ((SECONDS - start >= secs)); then
            break
        fi
        if ! live_pid "$RELAY_PID" pgrelay >/dev/null &&
            ! live_pid "$DEMO/pgrelay.started" pgrelay >/dev/null; then
            echo "pgrelay has exited:" >&2
            tail -n 5 "$RELAY_LOG" >&2
            exit 1
        fi
        if ! live_pid "$CONTROL_PID" pgrelay-control >/dev/null &&
            ! live_pid "$DEMO/control.started" pgrelay-control >/dev/null; then
            echo "pgrelay-control has exited:" >&2
            tail -n 5 "$CONTROL_LOG" >&2
            exit 1
        fi
        sleep 1
    done
}

case ${1:-start} in
start) cmd_start ;;
stop) cmd_stop ;;
*)
    echo "usage: $0 [start|stop]" >&2
    exit 2
    ;;
esac
