#!/usr/bin/env bash
# Make sure PostgreSQL, RabbitMQ and Redis answer on their local ports.
# A service that is installed but stopped is started; one that is not installed is named with
# the Debian package that provides it, and the script exits non-zero.
set -u

PG_PORT=${PG_PORT:-5432}
AMQP_PORT=${AMQP_PORT:-5672}
REDIS_PORT=${REDIS_PORT:-6379}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # port, name, seconds
  for _ in $(seq 1 "$3"); do listening "$1" && return 0; sleep 1; done
  echo "error: $2 did not start listening on 127.0.0.1:$1 within $3 s" >&2
  return 1
}

missing=0

if listening "$PG_PORT"; then
  echo "PostgreSQL: up on 127.0.0.1:$PG_PORT"
elif command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  echo "PostgreSQL: down; starting it: pg_ctlcluster $(ls /etc/postgresql) main start"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start \
    && wait_port "$PG_PORT" PostgreSQL 30 || missing=1
else
  echo "PostgreSQL: not installed. Install it: apt-get install postgresql" >&2
  missing=1
fi

if listening "$AMQP_PORT"; then
  echo "RabbitMQ: up on 127.0.0.1:$AMQP_PORT"
elif command -v rabbitmq-server >/dev/null 2>&1; then
  echo "RabbitMQ: down; starting it: rabbitmq-server -detached"
  rabbitmq-server -detached && wait_port "$AMQP_PORT" RabbitMQ 60 || missing=1
else
  echo "RabbitMQ: not installed. Install it: apt-get install rabbitmq-server" >&2
  missing=1
fi

if listening "$REDIS_PORT"; then
  echo "Redis: up on 127.0.0.1:$REDIS_PORT"
elif command -v redis-server >/dev/null 2>&1; then
  echo "Redis: down; starting it: redis-server --daemonize yes --bind 127.0.0.1 --port $REDIS_PORT"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    && wait_port "$REDIS_PORT" Redis 20 || missing=1
else
  echo "Redis: not installed. Install it: apt-get install redis-server" >&2
  missing=1
fi

exit $missing
