#!/usr/bin/env bash
# Instructions per cache hit, counted by valgrind's callgrind (repeatable where wall-clock time is
# not): the bare handler of examples/bench.rs (the floor), the former SHA-256 ceiling, and the
# broker at RUST_LOG=warn and at the default level with 1 caller and 1 cached key, and at the
# default level with requests rotating over 1,000 callers and 1,000 cached keys. A measurement
# with a miss in it stops the script. With CACHE_SIM=1, callgrind also simulates the caches and
# the table gains a cycle estimate (instructions + 10 x first-level misses + 100 x last-level
# misses, the last level sized as this machine's 512 KB L2), which sees what instruction counts
# do not: data that is not in the cache (docs/performance.md, "Remembered tokens"). The
# simulation slows the server down, so that fewer hits fall within a kept grant's one-second
# memory: its instruction counts are a little higher than without it.
#   bash bench/instructions.sh
# Environment: SECONDS_PER_RUN (default 10) of load per measurement, after a warm-up; CACHE_SIM=1.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
CACHE_SIM=${CACHE_SIM:-0}
SIMULATION=()
if [ "$CACHE_SIM" = 1 ]; then
    SIMULATION=(--cache-sim=yes --I1=32768,8,64 --D1=32768,8,64 --LL=524288,8,64)
fi
for tool in valgrind wrk; do
    if ! command -v $tool >/dev/null; then
        if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $tool
        else sudo apt-get update -qq && sudo apt-get install -y -qq $tool; fi
    fi
done
cargo build --release --locked --bin token-broker --example bench
BROKER=target/release/token-broker
HELPER=target/release/examples/bench
KEY=tbk_bench-caller-key
export BENCH_KEY=$KEY
WORK=$(mktemp -d)
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK" 2>/dev/null || true; }
trap cleanup EXIT

wait_for() { # URL: any HTTP answer
    for _ in $(seq 600); do
        if curl -s -o /dev/null "$1"; then return 0; fi
        sleep 0.1
    done
    echo "not answering: $1" >&2; exit 1
}
hash_of() { printf %s "$1" | sha256sum | cut -d' ' -f1; }

config() { # PORT CALLERS
    printf '[server]\nlisten = "127.0.0.1:%s"\n' "$1"
    printf '[tenants.bench.environments.production]\ntoken_url = "http://127.0.0.1:9110/oauth/token"\n'
    printf 'client_id = "bench"\nclient_secret = "bench-secret"\naudience = "urn:bench"\n'
    printf '[callers.bench]\nkey_sha256 = "%s"\nallow = ["*/*"]\n' "$(hash_of "$KEY")"
    for i in $(seq "$2"); do
        printf '[callers.c%s]\nkey_sha256 = "%s"\nallow = ["*/*"]\n' "$i" "$(hash_of "tbk_bench-caller-$i")"
    done
}

# Zeroes the counts after a warm-up, loads for SECONDS_PER_RUN, dumps, and prints Ir per answer.
measure() { # NAME PID URL CALLERS CACHED_KEYS
    local name=$1 pid=$2 url=$3
    export BENCH_KEYS=$4 BENCH_AUDIENCES=$5
    wrk -t1 -c4 -d3s -s bench/count.lua "$url" >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    local idp_before out
    idp_before=$(curl -fs http://127.0.0.1:9110/count)
    out=$(wrk -t1 -c4 -d"${SECONDS_PER_RUN}s" -s bench/count.lua "$url" | grep '^REQUESTS')
    # Every answer measured is a hit: the IdP saw no request meanwhile.
    [ "$(curl -fs http://127.0.0.1:9110/count)" = "$idp_before" ] || { echo "misses during $name" >&2; exit 1; }
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 1
    local requests=${out#REQUESTS }; requests=${requests%% *}
    local dump
    dump=$(ls -t "$WORK"/callgrind.out.$pid.* | head -1)
    # events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
    local counts
    counts=$(awk '/^(summary|totals):/ {print; exit}' "$dump")
    awk -v name="$name" -v r="$requests" '{
        ir = $2
        printf "| %s | %s | %s | %.1fk |", name, r, ir, ir / r / 1000
        if (NF >= 10) {
            l1 = $5 + $6 + $7; ll = $8 + $9 + $10
            printf " %.1f | %.1fk |", ll / r, (ir + 10 * l1 + 100 * ll) / r / 1000
        }
        printf "\n"
    }' <<<"$counts"
}

under_callgrind() { # NAME PORT LOG_LEVEL -- COMMAND...
    local name=$1 port=$2 level=$3; shift 4
    RUST_LOG=$level valgrind --tool=callgrind "${SIMULATION[@]}" \
        --callgrind-out-file="$WORK/callgrind.out.%p" "$@" \
        2>"$WORK/$name.log" &
    PIDS+=($!)
    echo $! >"$WORK/$name.pid"
}

"$HELPER" idp --listen 127.0.0.1:9110 --delay-ms 1 --lifetime 3600 & PIDS+=($!)
wait_for http://127.0.0.1:9110/count

if [ "$CACHE_SIM" = 1 ]; then
    echo "| server | answers | instructions | per answer | last-level misses per answer | cycle estimate per answer |"
    echo "| --- | --- | --- | --- | --- | --- |"
else
    echo "| server | answers | instructions | per answer |"
    echo "| --- | --- | --- | --- |"
fi

under_callgrind bare 9210 warn -- "$HELPER" bare --listen 127.0.0.1:9210 --key "$KEY"
wait_for http://127.0.0.1:9210/v1/tokens/bench/production
measure "bare handler (the floor)" "$(cat "$WORK/bare.pid")" http://127.0.0.1:9210/v1/tokens/bench/production 0 0
under_callgrind sha256 9211 warn -- "$HELPER" sha256-ceiling --listen 127.0.0.1:9211 --key-sha256 "$(hash_of "$KEY")"
wait_for http://127.0.0.1:9211/v1/tokens/bench/production
measure "former ceiling (bare handler, SHA-256 of the key)" "$(cat "$WORK/sha256.pid")" http://127.0.0.1:9211/v1/tokens/bench/production 0 0

for run in "warn 0 0" "info 0 0" "info 1000 1000"; do
    set -- $run
    level=$1 callers=$2 cached=$3
    port=$((9310 + callers / 1000 + ${#level}))
    config "$port" "$callers" >"$WORK/broker-$level-$callers.toml"
    under_callgrind "broker-$level-$callers" "$port" "$level" -- "$BROKER" serve --config "$WORK/broker-$level-$callers.toml"
    wait_for "http://127.0.0.1:$port/livez"
    url="http://127.0.0.1:$port/v1/tokens/bench/production"
    curl -fs -o /dev/null -H "Authorization: Bearer $KEY" "$url"
    if [ "$cached" -gt 0 ]; then
        # Each caller fetches its own key, as services do: it is the first caller its token
        # went to.
        "$HELPER" fill --url "$url" --callers "$callers" --from 0 --to "$cached" --concurrency 16 \
            | grep -q 'failures=0$'
    fi
    measure "broker, RUST_LOG=$level, $((callers > 0 ? callers : 1)) caller(s), $((cached > 0 ? cached : 1)) cached key(s)" \
        "$(cat "$WORK/broker-$level-$callers.pid")" "$url" "$callers" "$cached"
    kill "$(cat "$WORK/broker-$level-$callers.pid")" 2>/dev/null || true
done
