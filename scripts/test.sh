#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests start themselves
# (redis-server for the shared-cache tests, redis-cli from redis-tools to join the Redis Cluster
# tests' nodes, curl for the dev-mode test, prometheus and promtool for the monitoring tests, both
# in Debian's prometheus package) when it is missing, then runs
# `cargo test --locked` with any arguments given (for example a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v curl >/dev/null || missing+=(curl)
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    missing+=(prometheus)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    if command -v apt-get >/dev/null; then
        echo "installing ${missing[*]} with apt-get (the tests start their own)" >&2
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
        elif command -v sudo >/dev/null; then
            sudo apt-get update -qq
            sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
        else
            echo "error: ${missing[*]} missing, and neither root nor sudo is available to install it" >&2
            exit 1
        fi
    else
        echo "error: the tests need ${missing[*]} on the PATH; install it with your system's" >&2
        echo "package manager (Homebrew: brew install redis curl prometheus; Fedora: dnf install" >&2
        echo "redis curl, and Prometheus with promtool from prometheus.io; Alpine: apk add redis curl" >&2
        echo "prometheus), then run this script again" >&2
        exit 1
    fi
fi

exec cargo test --locked "$@"
