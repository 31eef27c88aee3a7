#!/bin/sh
# Entrypoint of docker/Dockerfile.redis, with the interface of the official redis image's
# docker-entrypoint.sh that docker/compose.yaml calls: `docker-entrypoint.sh redis-server ARGS`
# started as root runs redis-server as the `redis` user; any other command runs as given.
set -eu
if [ "${1:-}" = redis-server ] && [ "$(id -u)" = 0 ]; then
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
fi
exec "$@"
