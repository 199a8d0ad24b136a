#!/usr/bin/env bash
# Installs (Debian package) and starts a local PostgreSQL for the store tests, creates the
# `shoal` role and the `shoal_test` database, and prints the URL the tests read from
# SHOAL_TEST_POSTGRES_URL. Safe to run again: each step is skipped when already done.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -q "^$version main$"; then
    pg_createcluster "$version" main >&2
fi
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $4}' | grep -q online; then
    pg_ctlcluster "$version" main start >&2
fi
port=$(pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" {print $3}')
as_postgres() { su postgres -c "$1"; }
as_postgres "psql -p $port -tAc \"SELECT 1 FROM pg_roles WHERE rolname = 'shoal'\"" | grep -q 1 ||
    as_postgres "psql -p $port -qc \"CREATE ROLE shoal LOGIN PASSWORD 'shoal'\"" >&2
as_postgres "psql -p $port -tAc \"SELECT 1 FROM pg_database WHERE datname = 'shoal_test'\"" | grep -q 1 ||
    as_postgres "createdb -p $port -O shoal shoal_test" >&2
echo "postgres://shoal:shoal@127.0.0.1:$port/shoal_test"
