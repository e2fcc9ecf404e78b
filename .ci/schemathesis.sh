#!/usr/bin/env bash
# Checks that /openapi.json is the contract: schemathesis (from PyPI) sends schema-valid and
# schema-violating requests to a broker in dev mode, with a caller key, and checks every answer
# against the document. Two checks are excluded, each for one operation, for the reasons in
# docs/api.md (`GET /openapi.json`); everything else runs every check.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
SEED=20261201
if ! st --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    python3 -m pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo build --locked --quiet
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
out=$(mktemp)
./target/debug/token-broker dev --listen "127.0.0.1:$port" >"$out" 2>/dev/null &
broker=$!
trap 'kill "$broker" 2>/dev/null || true; rm -f "$out"' EXIT
for _ in $(seq 100); do
    grep -q 'tbk_' "$out" && break
    sleep 0.1
done
key=$(grep -o 'tbk_[A-Za-z0-9_-]*' "$out" | head -1)
[ -n "$key" ] || { echo "the dev broker printed no caller key" >&2; exit 1; }

schema="http://127.0.0.1:$port/openapi.json"
run() {
    st run "$schema" --checks all --max-examples 100 --seed "$SEED" \
        -H "Authorization: Bearer $key" --warnings off "$@"
}
handle_delete='DELETE /v1/users/handles/{handle}'
session_create='POST /v1/users/{tenant}/{environment}/sessions'
run --exclude-name "$handle_delete" --exclude-name "$session_create"
run --include-name "$handle_delete" --exclude-checks negative_data_rejection
run --include-name "$session_create" --exclude-checks positive_data_acceptance
