#!/usr/bin/env bash
# Installs what the real-NAT tests (tests/tests/real_nat.rs: network namespaces with iptables
# MASQUERADE routers) need, from Debian's packages, when it is missing: iproute2 and iptables.
# Needs root, as the tests do. Safe to run again: nothing is done when both are there.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
missing=()
have ip || missing+=(iproute2)
have iptables || missing+=(iptables)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "nat-for-tests.sh: installing ${missing[*]} needs root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
apt-get install -y -qq "${missing[@]}" >&2
