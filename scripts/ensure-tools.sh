#!/usr/bin/env bash
# Optional tools for the test suite: Debian's docker-compose (1.29) validates docker-compose.yml
# offline. Installed when missing and apt-get is usable; the compose test skips otherwise.
set -uo pipefail
if ! command -v docker-compose >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing docker-compose (Debian package) for the compose-file test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose) >/dev/null 2>&1 \
    || echo "docker-compose could not be installed; the compose test will skip"
fi
exit 0
