#!/usr/bin/env bash
# A team MLflow tracking server: PostgreSQL for runs, metrics and the model registry, and a served
# artifact store, both on this machine.
#
#   deploy/tracking-server.sh [start]   start PostgreSQL (initdb on first use) and `mlflow server`;
#                                       prints the MLFLOW_TRACKING_URI to use
#   deploy/tracking-server.sh stop      stop both (the data stays for the next start)
#   deploy/tracking-server.sh status    say what is running
#
# Settings (environment variables, all optional):
#   DEC_SERVER_DIR            state folder: postgres/ (data, log), artifacts/, mlflow.log, pid files,
#                             pgpass (default: ./tracking-server)
#   DEC_PG_PORT               PostgreSQL port on 127.0.0.1 (default 5433)
#   DEC_MLFLOW_PORT           mlflow server port (default 5050)
#   DEC_MLFLOW_HOST           interface the mlflow server binds (default 127.0.0.1)
#   DEC_MLFLOW_WORKERS        server worker processes (default 2)
#   DEC_PG_BIN                folder of initdb/pg_ctl/postgres (default: pg_config --bindir, then
#                             the newest /usr/lib/postgresql/*/bin, then PATH)
#   DEC_PG_OS_USER            system user that runs PostgreSQL when this script runs as root
#                             (PostgreSQL refuses root; default postgres, created if missing)
#   DEC_PG_DATA_ROOT          as root, where PostgreSQL's folder goes when that user cannot reach the
#                             state folder (a parent such as /root or a mktemp -d folder is private):
#                             a new folder under it (default /var/lib/dec-mlflow), linked from
#                             $DEC_SERVER_DIR/postgres
#   DEC_BACKEND_STORE_URI     use this database instead of the local PostgreSQL (nothing local is
#                             started), e.g. postgresql+psycopg://mlflow@db.example:5432/mlflow
#   DEC_ARTIFACTS_DESTINATION artifact store instead of $DEC_SERVER_DIR/artifacts, e.g. s3://bucket/mlflow
#   PYTHON                    interpreter that has mlflow and psycopg (default python3)
set -euo pipefail

cmd="${1:-start}"
dir="${DEC_SERVER_DIR:-$PWD/tracking-server}"
pg_port="${DEC_PG_PORT:-5433}"
mlflow_port="${DEC_MLFLOW_PORT:-5050}"
mlflow_host="${DEC_MLFLOW_HOST:-127.0.0.1}"
workers="${DEC_MLFLOW_WORKERS:-2}"
python="${PYTHON:-python3}"
db=mlflow
db_user=mlflow

die() { echo "tracking-server: $*" >&2; exit 1; }

case "$cmd" in start|stop|status) ;; *) die "unknown command '$cmd'; use start, stop or status" ;; esac
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
pgdir="$dir/postgres"      # owned by the PostgreSQL user: data/ and postgres.log (see setup_pg_user)
pgdata="$pgdir/data"
mlflow_pid="$dir/mlflow.pid"

find_pg_bin() {
    local d
    for d in "${DEC_PG_BIN:-}" "$(pg_config --bindir 2>/dev/null || true)" $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]] && { echo "$d"; return; }
    done
    d="$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")"
    [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] && { echo "$d"; return; }
    die "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install PostgreSQL (Debian: apt-get install postgresql) or set DEC_PG_BIN"
}

# PostgreSQL refuses to run as root: as root, run its server commands as an unprivileged user, from a folder it can
# enter (its tools complain when they cannot return to a private working folder).
as_pg() {
    if [[ "$(id -u)" -ne 0 ]]; then "$@"; else (cd / && runuser -u "$pg_os_user" -- "$@"); fi
}

setup_pg_user() {
    pg_os_user="$(id -un)"
    [[ "$(id -u)" -ne 0 ]] && return
    pg_os_user="${DEC_PG_OS_USER:-postgres}"
    if ! id "$pg_os_user" >/dev/null 2>&1; then
        useradd --system --no-create-home --shell /usr/sbin/nologin "$pg_os_user" \
            || die "cannot create the system user '$pg_os_user' to run PostgreSQL (set DEC_PG_OS_USER to an existing one)"
    fi
    command -v runuser >/dev/null || die "runuser (util-linux) is needed to run PostgreSQL as '$pg_os_user'"
    place_pg_dir
    [[ "$cmd" == start ]] || return 0  # stop and status only act on what start made
    chown "$pg_os_user" "$pgdir"
    chmod 700 "$pgdir"
    runuser -u "$pg_os_user" -- test -w "$pgdir" \
        || die "user '$pg_os_user' cannot reach $pgdir: make its parent folders searchable (chmod o+x) or set DEC_PG_DATA_ROOT elsewhere"
}

# As root, PostgreSQL's user must reach its folder by itself, path and all. In a state folder under a private parent
# (root's home, a mktemp -d folder) it cannot: the folder then goes under DEC_PG_DATA_ROOT, root-owned and 0755 up
# to it, and $dir/postgres becomes a link to it, which later calls follow (PostgreSQL itself is given the real path).
place_pg_dir() {
    if [[ -L "$dir/postgres" ]]; then
        pgdir="$(readlink -f "$dir/postgres")"
    elif [[ "$cmd" != start ]]; then
        :  # nothing to place
    elif [[ -f "$dir/postgres/data/PG_VERSION" ]] || runuser -u "$pg_os_user" -- test -x "$dir"; then
        mkdir -p "$pgdir"
    else
        # an empty folder left by a start that stopped here before: give way to the link
        [[ -e "$dir/postgres" ]] && { rmdir "$dir/postgres" 2>/dev/null || die "$dir/postgres holds files but no PostgreSQL data: move it away"; }
        local root="${DEC_PG_DATA_ROOT:-/var/lib/dec-mlflow}"
        install -d -m 0755 "$root" || die "cannot create $root for PostgreSQL's data (set DEC_PG_DATA_ROOT)"
        pgdir="$(mktemp -d "$root/postgres-XXXXXX")"
        ln -s "$pgdir" "$dir/postgres"
        echo "tracking-server: user '$pg_os_user' cannot reach $dir, so PostgreSQL's folder is $pgdir (linked from $dir/postgres)" >&2
    fi
    pgdata="$pgdir/data"
}

pg_running() { [[ -d "$pgdata" ]] && as_pg "$pg_bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; }
mlflow_running() { [[ -f "$mlflow_pid" ]] && kill -0 "$(cat "$mlflow_pid")" 2>/dev/null; }
psql_() { "$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U "$db_user" -X -q -v ON_ERROR_STOP=1 "$@"; }

start_postgres() {
    mkdir -p "$pgdir"
    if [[ ! -s "$PGPASSFILE" ]]; then
        (umask 077; echo "127.0.0.1:*:*:$db_user:$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')" >"$PGPASSFILE")
    fi
    if [[ ! -f "$pgdata/PG_VERSION" ]]; then
        echo "tracking-server: first use, creating the PostgreSQL data directory $pgdata" >&2
        local pwfile="$pgdir/.pwfile"
        (umask 077; cut -d: -f5- "$PGPASSFILE" >"$pwfile")
        [[ "$(id -u)" -eq 0 ]] && chown "$pg_os_user" "$pwfile"
        # password (scram) for every TCP connection, and no Unix socket: only 127.0.0.1 is used
        as_pg "$pg_bin/initdb" -D "$pgdata" -U "$db_user" --pwfile="$pwfile" --auth=scram-sha-256 \
            --encoding=UTF8 --locale=C >"$dir/initdb.log" 2>&1 || { rm -f "$pwfile"; die "initdb failed; see $dir/initdb.log"; }
        rm -f "$pwfile"
    fi
    if ! pg_running; then
        as_pg "$pg_bin/pg_ctl" -D "$pgdata" -l "$pgdir/postgres.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $pg_port -c unix_socket_directories=''" start >/dev/null \
            || die "PostgreSQL did not start; see $pgdir/postgres.log"
    fi
    if [[ -z "$(psql_ -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]]; then
        psql_ -d postgres -c "CREATE DATABASE $db" || die "could not create database '$db'"
    fi
}

start_mlflow() {
    local backend="$1" artifacts="$2" i
    # its own session (setsid), so that stop can end the server and all its workers as one group
    setsid "$python" -m mlflow server --backend-store-uri "$backend" --artifacts-destination "$artifacts" \
        --serve-artifacts --host "$mlflow_host" --port "$mlflow_port" --workers "$workers" \
        >"$dir/mlflow.log" 2>&1 < /dev/null &
    echo $! >"$mlflow_pid"
    for i in $(seq 1 180); do  # the first start creates the tables: tens of seconds
        if "$python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
            "http://127.0.0.1:$mlflow_port/health" 2>/dev/null; then
            return
        fi
        mlflow_running || die "mlflow server exited; see $dir/mlflow.log"
        sleep 1
    done
    die "mlflow server did not answer on port $mlflow_port within 180 s; see $dir/mlflow.log"
}

stop_mlflow() {
    local pid i
    mlflow_running || { rm -f "$mlflow_pid"; return; }
    pid="$(cat "$mlflow_pid")"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for i in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$mlflow_pid"
    echo "tracking-server: mlflow server stopped" >&2
}

uri="http://127.0.0.1:$mlflow_port"
local_pg=1
[[ -n "${DEC_BACKEND_STORE_URI:-}" ]] && local_pg=0
if [[ $local_pg -eq 1 ]]; then
    export PGPASSFILE="$dir/pgpass"  # libpq (psql, psycopg in mlflow server) reads the password here
    pg_bin="$(find_pg_bin)"
    setup_pg_user
fi

case "$cmd" in
start)
    if mlflow_running; then
        echo "tracking-server: already running (pid $(cat "$mlflow_pid"))" >&2
    else
        backend="${DEC_BACKEND_STORE_URI:-postgresql+psycopg://$db_user@127.0.0.1:$pg_port/$db}"
        artifacts="${DEC_ARTIFACTS_DESTINATION:-$dir/artifacts}"
        [[ "$artifacts" == *://* ]] || mkdir -p "$artifacts"
        "$python" -c "import mlflow" 2>/dev/null || die "$python cannot import mlflow: activate the project's environment or set PYTHON"
        case "$backend" in
            postgresql+psycopg://*) "$python" -c "import psycopg" 2>/dev/null || die "$python cannot import psycopg: pip install 'dec-mlflow[server]'" ;;
            postgresql+psycopg2://*) "$python" -c "import psycopg2" 2>/dev/null || die "$python cannot import psycopg2: pip install psycopg2-binary" ;;
        esac
        if [[ $local_pg -eq 1 ]]; then start_postgres; fi
        start_mlflow "$backend" "$artifacts"
        echo "tracking-server: mlflow server on $uri (backend ${backend%%://*}, artifacts $artifacts); logs in $dir" >&2
    fi
    echo "export MLFLOW_TRACKING_URI=$uri"
    ;;
stop)
    stop_mlflow
    if [[ $local_pg -eq 1 ]] && pg_running; then
        as_pg "$pg_bin/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null
        echo "tracking-server: PostgreSQL stopped" >&2
    fi
    ;;
status)
    if mlflow_running; then echo "mlflow server: running (pid $(cat "$mlflow_pid")), $uri"; else echo "mlflow server: stopped"; fi
    if [[ $local_pg -eq 1 ]]; then
        if pg_running; then echo "PostgreSQL: running, 127.0.0.1:$pg_port, data $pgdata"; else echo "PostgreSQL: stopped"; fi
    fi
    ;;
esac
