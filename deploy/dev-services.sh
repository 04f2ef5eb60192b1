#!/usr/bin/env bash
# Development/test services for TotalRecall, on loopback only: PostgreSQL 15, Redis, moto (S3).
#
#   deploy/dev-services.sh start | stop | restart | status | env
#   deploy/dev-services.sh start-postgres | stop-postgres [fast|immediate] | start-redis | stop-redis
#                          start-s3 | stop-s3        (one service at a time, for fault-injection tests)
#   eval "$(deploy/dev-services.sh env)"             (export the URLs, test variables included)
#
# Settings (environment): TOTALRECALL_SERVICES_DIR (state folder, default /tmp/totalrecall-services),
# TOTALRECALL_PG_PORT (54329), TOTALRECALL_REDIS_PORT (63799), TOTALRECALL_S3_PORT (50009),
# TOTALRECALL_PG_PASSWORD (default: random, generated once and kept in the state folder),
# PG_BIN (/usr/lib/postgresql/15/bin).
#
# initdb and pg_ctl refuse to run as root: when run as root they run as the `postgres` user, which owns
# the data folder. The superuser connects only through a Unix socket inside the state folder; TCP logins
# need a password (scram-sha-256). Data is throw-away: fsync is off and moto keeps everything in memory.
set -euo pipefail

STATE_DIR=$(realpath -m "${TOTALRECALL_SERVICES_DIR:-/tmp/totalrecall-services}")  # absolute: as_pg runs from /
PG_PORT=${TOTALRECALL_PG_PORT:-54329}
REDIS_PORT=${TOTALRECALL_REDIS_PORT:-63799}
S3_PORT=${TOTALRECALL_S3_PORT:-50009}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
HOST=127.0.0.1
PG_DB=totalrecall
PG_USER=totalrecall

PG_DIR=$STATE_DIR/postgres
PG_DATA=$PG_DIR/data
PG_LOG=$PG_DIR/postgres.log
PG_PASSWORD_FILE=$STATE_DIR/pg-password
REDIS_DIR=$STATE_DIR/redis
S3_DIR=$STATE_DIR/moto

log() { echo "dev-services: $*" >&2; }
die() { log "error: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

wait_port() {  # port name [seconds]
  local i
  for ((i = 0; i < ${3:-30} * 10; i++)); do
    port_open "$1" && return 0
    sleep 0.1
  done
  die "$2 did not open $HOST:$1 in ${3:-30}s"
}

wait_port_closed() {  # port name
  local i
  for ((i = 0; i < 300; i++)); do
    port_open "$1" || return 0
    sleep 0.1
  done
  die "$2 still listening on $HOST:$1"
}

# Run as the PostgreSQL owner: `postgres` when we are root (from /, since it may not enter our working
# directory), ourselves otherwise.
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

pg_password() {
  if [ -n "${TOTALRECALL_PG_PASSWORD:-}" ]; then
    printf '%s' "$TOTALRECALL_PG_PASSWORD"
  elif [ -s "$PG_PASSWORD_FILE" ]; then
    cat "$PG_PASSWORD_FILE"
  else
    mkdir -p "$STATE_DIR"
    (umask 077 && head -c 18 /dev/urandom | base64 | tr '+/' 'xy' >"$PG_PASSWORD_FILE")
    cat "$PG_PASSWORD_FILE"
  fi
}

pg_running() { [ -f "$PG_DATA/postmaster.pid" ] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; }

start_postgres() {
  [ -x "$PG_BIN/initdb" ] || die "PostgreSQL 15 not found in $PG_BIN (apt-get install -y postgresql-15)"
  mkdir -p "$STATE_DIR"
  chmod 755 "$STATE_DIR"
  if [ ! -s "$PG_DATA/PG_VERSION" ]; then
    log "initialising PostgreSQL in $PG_DATA"
    mkdir -p "$PG_DIR"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$PG_DIR"
    chmod 700 "$PG_DIR"
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C \
      --auth-local=trust --auth-host=scram-sha-256 >"$PG_DIR/initdb.log"
    as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null <<EOF
# --- totalrecall dev-services ---
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
  fi
  if pg_running; then
    log "PostgreSQL already running on $HOST:$PG_PORT"
  else
    log "starting PostgreSQL on $HOST:$PG_PORT"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null
  fi
  wait_port "$PG_PORT" PostgreSQL
  # Application user (CREATEDB for per-test databases, CREATEROLE for the read-only role) and database.
  # The password goes through stdin, not argv (which `ps` shows).
  {
    printf '%s\n' "\\set pw '$(pg_password | sed -e "s/\\\\/\\\\\\\\/g" -e "s/'/''/g")'"
    cat <<'SQL'
SELECT format('CREATE ROLE %I LOGIN CREATEDB CREATEROLE', :'user')
  WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'user') \gexec
ALTER ROLE :"user" WITH LOGIN CREATEDB CREATEROLE PASSWORD :'pw';
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'user')
  WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SQL
  } | as_pg "$PG_BIN/psql" -h "$PG_DIR" -p "$PG_PORT" -U postgres -d postgres -qAt -v ON_ERROR_STOP=1 \
    -v user="$PG_USER" -v db="$PG_DB" >/dev/null
}

stop_postgres() {  # [fast|immediate]
  if pg_running; then
    log "stopping PostgreSQL (${1:-fast})"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m "${1:-fast}" -w -t 60 stop >/dev/null
  else
    log "PostgreSQL not running"
  fi
}

start_redis() {
  command -v redis-server >/dev/null || die "redis-server not found (apt-get install -y redis-server)"
  mkdir -p "$REDIS_DIR"
  if port_open "$REDIS_PORT"; then
    log "Redis already running on $HOST:$REDIS_PORT"
    return
  fi
  log "starting Redis on $HOST:$REDIS_PORT"
  redis-server --bind "$HOST" --port "$REDIS_PORT" --daemonize yes --save '' --appendonly no \
    --protected-mode yes --dir "$REDIS_DIR" --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log"
  wait_port "$REDIS_PORT" Redis
}

# Kill the process in a pid file if it is still the one we started (guards against a recycled pid).
stop_pidfile() {  # pidfile name expected-cmdline-word port
  local pid
  if [ -f "$1" ] && pid=$(cat "$1") && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
      && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$3"; then
    log "stopping $2 (pid $pid)"
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    wait_port_closed "$4" "$2"
  else
    log "$2 not running"
  fi
  rm -f "$1"
}

stop_redis() { stop_pidfile "$REDIS_DIR/redis.pid" Redis redis-server "$REDIS_PORT"; }

start_s3() {
  mkdir -p "$S3_DIR"
  if port_open "$S3_PORT"; then
    log "moto already running on $HOST:$S3_PORT"
    return
  fi
  local cmd
  if command -v moto_server >/dev/null; then
    cmd=(moto_server)
  else
    cmd=(python3 -m moto.server)
  fi
  log "starting moto (S3) on $HOST:$S3_PORT"
  setsid nohup "${cmd[@]}" -H "$HOST" -p "$S3_PORT" >"$S3_DIR/moto.log" 2>&1 </dev/null &
  echo $! >"$S3_DIR/moto.pid"
  wait_port "$S3_PORT" moto 60
}

stop_s3() { stop_pidfile "$S3_DIR/moto.pid" moto moto "$S3_PORT"; }

urlencode() {  # percent-encode bytes outside RFC 3986 unreserved
  local LC_ALL=C s=$1 out='' c i
  for ((i = 0; i < ${#s}; i++)); do
    c=${s:i:1}
    case $c in
      [a-zA-Z0-9.~_-]) out+=$c ;;
      *) out+=$(printf '%%%02X' "'$c") ;;
    esac
  done
  printf '%s' "$out"
}

print_env() {
  local pw db_url
  pw=$(urlencode "$(pg_password)")
  db_url="postgresql+psycopg2://$PG_USER:$pw@$HOST:$PG_PORT/$PG_DB"
  cat <<EOF
export TOTALRECALL_DATABASE_URL='$db_url'
export TOTALRECALL_BROKER_URL='redis://$HOST:$REDIS_PORT/0'
export AWS_ENDPOINT_URL='http://$HOST:$S3_PORT'
export AWS_ACCESS_KEY_ID='testing'
export AWS_SECRET_ACCESS_KEY='testing'
export AWS_DEFAULT_REGION='us-east-1'
export TOTALRECALL_TEST_PG_URL='$db_url'
export TOTALRECALL_TEST_REDIS_URL='redis://$HOST:$REDIS_PORT/15'
export TOTALRECALL_TEST_S3_ENDPOINT='http://$HOST:$S3_PORT'
export TOTALRECALL_SERVICES_SCRIPT='$(cd "$(dirname "$0")" && pwd)/$(basename "$0")'
EOF
}

status() {
  local name port
  for name in postgres:$PG_PORT redis:$REDIS_PORT s3:$S3_PORT; do
    port=${name#*:}
    if port_open "$port"; then echo "${name%%:*}: up ($HOST:$port)"; else echo "${name%%:*}: down"; fi
  done
}

case "${1:-}" in
  start) start_postgres; start_redis; start_s3 ;;
  stop) stop_s3; stop_redis; stop_postgres ;;
  restart) "$0" stop; "$0" start ;;
  status) status ;;
  env) print_env ;;
  start-postgres) start_postgres ;;
  stop-postgres) stop_postgres "${2:-fast}" ;;
  start-redis) start_redis ;;
  stop-redis) stop_redis ;;
  start-s3 | start-moto) start_s3 ;;
  stop-s3 | stop-moto) stop_s3 ;;
  *)
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
