#!/usr/bin/env bash
# Make PostgreSQL's server binaries available for the tracking-server test (tests/test_postgres_tracking.py).
#
#   infra/postgres-test.sh install   # no-op when pg_ctl is found; as root, installs Debian's `postgresql`
#   infra/postgres-test.sh bindir    # prints the folder holding pg_ctl/initdb (exit 1 when there is none)
#
# The test starts and stops its own throwaway cluster; this script only makes sure it can.
set -euo pipefail

bindir() {
    if command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v pg_ctl)")"
        return 0
    fi
    # Debian keeps the server binaries off PATH, one folder per major version: take the newest.
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$found" && -x "$found/pg_ctl" ]]; then
        echo "$found"
        return 0
    fi
    return 1
}

install() {
    if bindir >/dev/null; then
        echo "postgresql: server binaries in $(bindir)"
        return 0
    fi
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        echo "postgresql: pg_ctl not found; install PostgreSQL's server (Debian/Ubuntu: apt-get install postgresql)" >&2
        return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    echo "postgresql: installed, server binaries in $(bindir)"
}

case "${1:-install}" in
    install) install ;;
    bindir) bindir ;;
    *) echo "usage: $0 [install|bindir]" >&2; exit 2 ;;
esac
