#!/usr/bin/env bash
# Start Redis and PostgreSQL on this machine if they are not already running (docs/design.md §8).
# The same commands start them on CI and on a fresh machine of this kind.
set -euo pipefail

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting redis-server on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  echo "starting PostgreSQL on 127.0.0.1:5432"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
for _ in $(seq 1 30); do
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && pg_isready -h 127.0.0.1 -p 5432 -q; then
    echo "redis: $(redis-cli -h 127.0.0.1 -p 6379 ping); postgres: $(pg_isready -h 127.0.0.1 -p 5432)"
    exit 0
  fi
  sleep 1
done
echo "Redis or PostgreSQL did not come up within 30 s" >&2
exit 1
