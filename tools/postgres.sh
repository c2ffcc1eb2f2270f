#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests, listening only on a Unix socket in DIR (no TCP port, nothing shared):
#   tools/postgres.sh start DIR   initialise and start it; print its SQLAlchemy URL
#   tools/postgres.sh stop DIR    stop it and delete DIR
#   tools/postgres.sh pause DIR   stop it, keeping its data (an outage, for the tests that need one)
#   tools/postgres.sh resume DIR  start it again
# It uses Debian's `postgresql` package (installed here when missing and we are root) and runs as the `postgres`
# user when started by root, since PostgreSQL refuses to run as root.
set -euo pipefail
cmd=${1:?start, stop, pause or resume}; dir=${2:?a folder}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$bin" ] && [ "$cmd" = start ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
[ -n "$bin" ] || { echo "tools/postgres.sh: PostgreSQL is not installed (Debian: apt-get install postgresql)" >&2; exit 1; }
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case $cmd in
start)
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
    as_owner "$bin/initdb" -D "$dir/data" -U postgres -A trust --no-sync >/dev/null
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o "-k $dir -c listen_addresses= -c fsync=off" start >/dev/null
    echo "postgresql+psycopg://postgres@/postgres?host=$dir"
    ;;
pause) as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null ;;
resume) as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o "-k $dir -c listen_addresses= -c fsync=off" start >/dev/null ;;
stop)
    if [ -d "$dir/data" ]; then as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true; fi
    rm -rf "$dir"
    ;;
*) echo "tools/postgres.sh: start, stop, pause or resume, not $cmd" >&2; exit 2 ;;
esac
