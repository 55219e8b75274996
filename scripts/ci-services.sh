#!/usr/bin/env bash
# Services the test suite starts by itself: a throwaway PostgreSQL cluster (tests/test_jobs_store.py
# runs initdb/pg_ctl on loopback under a temp dir) needs the server binaries and the psycopg driver.
# Idempotent; safe to run on a machine that already has them.
set -euo pipefail

if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
python -c "import psycopg" 2>/dev/null || python -m pip install -q "psycopg[binary]>=3.1"

# The dashboard tests (tests/test_ui.py) drive Debian's headless Chromium through its own
# chromedriver with Selenium; no browser is ever downloaded by a test.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
python -c "import selenium" 2>/dev/null || python -m pip install -q "selenium>=4.20"
