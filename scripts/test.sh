#!/usr/bin/env bash
# Every test. Starts a local PostgreSQL for the store tests first (installing it from Debian's
# packages if needed, see postgres-for-tests.sh) and installs iptables for the real-NAT tests
# (nat-for-tests.sh); where that cannot be done those tests say they were skipped, and under
# CI=true a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${SHOAL_TEST_POSTGRES_URL:-}" ]; then
    if url=$(scripts/postgres-for-tests.sh); then
        export SHOAL_TEST_POSTGRES_URL="$url"
    else
        echo "scripts/test.sh: could not start PostgreSQL; its tests will be skipped" >&2
    fi
fi
if ! scripts/nat-for-tests.sh; then
    echo "scripts/test.sh: could not install iptables; the real-NAT tests will be skipped" >&2
fi
exec cargo test --workspace "$@"
