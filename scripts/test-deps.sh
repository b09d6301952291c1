#!/usr/bin/env bash
# What the tests need besides Python packages: haproxy (a real proxy in front of two replicas)
# and the npm packages of the Node.js client and of the HTTP routes' test (the openai package).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v haproxy >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get install -y -q haproxy >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q haproxy >/dev/null; }
fi
npm ci --prefix clients/node --no-audit --no-fund --loglevel=error
npm ci --prefix tests/http_node --no-audit --no-fund --loglevel=error
