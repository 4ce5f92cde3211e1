#!/usr/bin/env bash
# Start Redis, PostgreSQL and RabbitMQ on this machine if they are not already running
# (docs/design.md §8). The same commands start them on CI and on a fresh machine of this kind.
set -euo pipefail

# RabbitMQ answers on 127.0.0.1:5672 when it sends back an AMQP frame for the protocol header.
amqp_answers() {
  timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672 && printf "AMQP\x00\x00\x09\x01" >&3 \
    && [ "$(head -c 1 <&3 | od -An -tx1 | tr -d " ")" = 01 ]' 2>/dev/null
}

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
rabbit=0
if command -v rabbitmq-server >/dev/null 2>&1; then
  rabbit=1
  if ! amqp_answers; then
    echo "starting RabbitMQ on 127.0.0.1:5672"
    if [ -x /etc/init.d/rabbitmq-server ]; then
      service rabbitmq-server start || true
    else
      rabbitmq-server -detached || true
    fi
  fi
else
  echo "RabbitMQ is not installed: tests/test_rabbitmq.py will skip" >&2
fi
for _ in $(seq 1 60); do
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && pg_isready -h 127.0.0.1 -p 5432 -q \
    && { [ "$rabbit" = 0 ] || amqp_answers; }; then
    echo "redis: $(redis-cli -h 127.0.0.1 -p 6379 ping); postgres: $(pg_isready -h 127.0.0.1 -p 5432)"
    if [ "$rabbit" = 1 ]; then
      if rabbitmqctl -q authenticate_user guest guest >/dev/null 2>&1; then
        echo "rabbitmq: 127.0.0.1:5672 answers, guest/guest accepted"
      else
        echo "rabbitmq: 127.0.0.1:5672 answers (guest/guest not checked: rabbitmqctl needs root)"
      fi
    fi
    exit 0
  fi
  sleep 1
done
echo "Redis, PostgreSQL or RabbitMQ did not come up within 60 s" >&2
exit 1
