#!/usr/bin/env bash
# What the tests need besides Python packages: haproxy (a real proxy in front of two replicas)
# and the Node.js client's npm packages. Idempotent; run by the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v haproxy >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get install -y -q haproxy >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q haproxy >/dev/null; }
fi
npm ci --prefix clients/node --no-audit --no-fund --loglevel=error
