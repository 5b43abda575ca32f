#!/bin/sh
# `make test` runs the PostgreSQL tests against a server on 127.0.0.1:5432 or a throwaway
# cluster started with initdb (tests/pg.py). This installs PostgreSQL with apt only when
# neither is available; otherwise it does nothing. It never fails the build: without
# PostgreSQL those tests are skipped, saying why.
set -u

if [ -n "${BEDSIDE_TEST_PG_URL:-}" ]; then
    exit 0  # the tests use that server
fi
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    exit 0  # tests/pg.py starts a throwaway cluster, or uses the local server
fi
PY="${PY:-python3}"
if "$PY" -c "import socket; socket.create_connection(('127.0.0.1', 5432), 2).close()" \
        >/dev/null 2>&1; then
    exit 0  # a server answers on 127.0.0.1:5432
fi

echo "ensure-postgres: no PostgreSQL server on 127.0.0.1:5432 and no initdb found"
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-postgres: no apt-get here; install PostgreSQL (initdb) with your package manager" \
        "or set BEDSIDE_TEST_PG_URL; until then the PostgreSQL tests are skipped"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-postgres: not root, so not installing; run: sudo apt-get install -y postgresql" \
        "(or set BEDSIDE_TEST_PG_URL); until then the PostgreSQL tests are skipped"
    exit 0
fi
echo "ensure-postgres: installing PostgreSQL with apt-get"
if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; then
    echo "ensure-postgres: installed"
else
    echo "ensure-postgres: apt-get failed; the PostgreSQL tests will be skipped"
fi
exit 0
