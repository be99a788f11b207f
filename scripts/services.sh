#!/usr/bin/env bash
# Make sure the services the tests talk to are running: Redis on 127.0.0.1:6379 and PostgreSQL on
# 127.0.0.1:5432 (trust auth for the `postgres` role), and Chromium for the UI tests. Starts them if installed but stopped; with
# TRAINYARD_INSTALL_SERVICES=1 (what .ci/run sets) it installs them from Debian's packages first.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif have sudo; then sudo "$@"; else "$@"; fi; }

redis_up() { have redis-cli && redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
postgres_up() { have pg_isready && pg_isready -q -h 127.0.0.1 -p 5432; }

if [ "${TRAINYARD_INSTALL_SERVICES:-0}" = 1 ]; then
  missing=()
  have redis-server || missing+=(redis-server)
  have pg_ctlcluster || missing+=(postgresql)
  [ -x /usr/bin/chromium ] || missing+=(chromium)   # the browser the UI tests drive (Playwright)
  if [ ${#missing[@]} -gt 0 ]; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}"
  fi
fi

if ! redis_up; then
  echo "starting Redis on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  for _ in $(seq 50); do redis_up && break; sleep 0.2; done
fi
redis_up || { echo "Redis is not reachable on 127.0.0.1:6379" >&2; exit 1; }

if ! postgres_up; then
  echo "starting PostgreSQL on 127.0.0.1:5432"
  version=$(ls /etc/postgresql | sort -V | tail -1)
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 100); do postgres_up && break; sleep 0.2; done
fi
postgres_up || { echo "PostgreSQL is not reachable on 127.0.0.1:5432" >&2; exit 1; }

# The tests connect as `postgres` over TCP; a fresh Debian cluster asks for a password there.
if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc 'select 1' >/dev/null 2>&1; then
  hba=$(as_root su postgres -c "psql -tAc 'show hba_file'")
  echo "allowing trust auth on 127.0.0.1 in $hba (test machine only)"
  as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  as_root su postgres -c "psql -tAc 'select pg_reload_conf()'" >/dev/null
fi
echo "services: Redis and PostgreSQL are up"
