#!/usr/bin/env bash
# The load benchmark of docs/performance.md. One command on a fresh machine:
#   bash bench/run.sh
# Environment: SECONDS_PER_RUN (default 10) for each throughput run, RUNS (default 5) interleaved
# runs of the bare handler and the broker per connection count (the medians are reported),
# ROLLOVER_SECONDS (default 60). The broker runs at the default log level, `info`, with the audit
# trail on, with one caller and one cached key, then with 1,000 callers and 1,000 cached keys.
# The server under test runs on CPU 0 and wrk on CPU 1 (taskset), so figures measure the server.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
RUNS=${RUNS:-5}
ROLLOVER_SECONDS=${ROLLOVER_SECONDS:-60}

if ! command -v wrk >/dev/null; then
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq wrk
    else sudo apt-get update -qq && sudo apt-get install -y -qq wrk; fi
fi
cargo build --release --locked --bin token-broker --example bench
BROKER=target/release/token-broker
HELPER=target/release/examples/bench

if [ "$(nproc)" -ge 2 ]; then SERVER_CPU=0; LOAD_CPU=1; else SERVER_CPU=0; LOAD_CPU=0; fi
KEY=tbk_bench-caller-key
HASH=$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)
export BENCH_KEY=$KEY
WORK=$(mktemp -d)
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

wait_for() { # URL
    for _ in $(seq 100); do
        if curl -fs -o /dev/null "$1"; then return 0; fi
        sleep 0.1
    done
    echo "not answering: $1" >&2; exit 1
}

config() { # PORT IDP_PORT MIN_REMAINING [CALLERS]
    for i in $(seq "${4:-0}"); do
        printf '[callers.c%s]\nkey_sha256 = "%s"\nallow = ["*/*"]\n' "$i" \
            "$(printf %s "tbk_bench-caller-$i" | sha256sum | cut -d' ' -f1)"
    done
    cat <<TOML
[server]
listen = "127.0.0.1:$1"
[cache]
max_entries = 200000
min_remaining = "$3"
[callers.bench]
key_sha256 = "$HASH"
allow = ["*/*"]
# The cold fill creates many keys at once: lift the caller's IdP bounds for it.
idp_requests_per_minute = 4000000000
max_keys = 200000
[tenants.bench.environments.production]
token_url = "http://127.0.0.1:$2/oauth/token"
client_id = "bench"
client_secret = "bench-secret"
audience = "urn:bench"
max_concurrent_fetches = 256
TOML
}

start_broker() { # NAME PORT IDP_PORT MIN_REMAINING [CALLERS]
    config "$2" "$3" "$4" "${5:-0}" > "$WORK/$1.toml"
    RUST_LOG=info taskset -c $SERVER_CPU "$BROKER" serve --config "$WORK/$1.toml" 2>"$WORK/$1.log" &
    PIDS+=($!)
    wait_for "http://127.0.0.1:$2/livez"
    echo $! > "$WORK/$1.pid"
}

load() { # URL CONNECTIONS SECONDS -> RESULT line
    taskset -c $LOAD_CPU wrk -t1 -c"$2" -d"$3"s -s bench/wrk.lua "$1" | grep '^RESULT'
}

field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
of() { while read -r line; do field "$2" "$line"; done <"$WORK/$1.$c" | median; } # SERVER FIELD, for $c
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
idp_count() { curl -fs "http://127.0.0.1:$1/count"; }

taskset -c $LOAD_CPU "$HELPER" idp --listen 127.0.0.1:9100 --delay-ms 50 --lifetime 3600 & PIDS+=($!)
taskset -c $LOAD_CPU "$HELPER" idp --listen 127.0.0.1:9101 --delay-ms 50 --lifetime 10 & PIDS+=($!)
# The floor: a bare axum handler with the broker's route, body size and headers, behind a
# constant-time comparison of the bearer key.
taskset -c $SERVER_CPU "$HELPER" bare --listen 127.0.0.1:9200 --key "$KEY" & PIDS+=($!)
wait_for http://127.0.0.1:9100/count
wait_for http://127.0.0.1:9101/count
start_broker hits 9300 9100 60s
start_broker rollover 9301 9101 2s

HITS=http://127.0.0.1:9300/v1/tokens/bench/production
CEILING=http://127.0.0.1:9200/v1/tokens/bench/production
curl -fs -o /dev/null -H "Authorization: Bearer $KEY" "$HITS"

echo "## Cache hits against the bare handler (median of $RUNS interleaved runs of ${SECONDS_PER_RUN}s, wrk -t1, server on CPU $SERVER_CPU, wrk on CPU $LOAD_CPU)"
echo
echo "| connections | bare req/s | broker req/s | ratio | bare p99 ms | broker p50 ms | p99 ms | p99.9 ms | p99 ratio | errors |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for c in 16 64 256; do
    : >"$WORK/ceiling.$c"; : >"$WORK/broker.$c"
    errors=0
    for _ in $(seq "$RUNS"); do
        load "$CEILING" $c "$SECONDS_PER_RUN" >>"$WORK/ceiling.$c"
        broker=$(load "$HITS" $c "$SECONDS_PER_RUN")
        echo "$broker" >>"$WORK/broker.$c"
        errors=$(( errors + $(field errors "$broker") + $(field non2xx "$broker") ))
    done
    c_rps=$(of ceiling rps); b_rps=$(of broker rps)
    ratio=$(awk -v b="$b_rps" -v c="$c_rps" 'BEGIN { printf "%.2f", b / c }')
    c_p99=$(of ceiling p99_ms); b_p99=$(of broker p99_ms)
    p99_ratio=$(awk -v b="$b_p99" -v c="$c_p99" 'BEGIN { printf "%.2f", b / c }')
    echo "| $c | $c_rps | $b_rps | $ratio | $c_p99 | $(of broker p50_ms) | $b_p99 | $(of broker p999_ms) | $p99_ratio | $errors |"
done
echo

echo "## 1,000 callers and 1,000 cached keys (64 connections, median of $RUNS interleaved runs; requests rotate over both)"
echo
start_broker many 9302 9100 60s 1000
MANY=http://127.0.0.1:9302/v1/tokens/bench/production
# Each caller fetches its own key, as services do: it is the first caller its token went to.
"$HELPER" fill --url "$MANY" --callers 1000 --from 0 --to 1000 --concurrency 64 | grep -q 'failures=0$'
many_before=$(idp_count 9100)
: >"$WORK/ceiling.many"; : >"$WORK/broker.many"
errors=0
for _ in $(seq "$RUNS"); do
    # The bare handler gets the same rotating paths (with its one key), so that wrk does the
    # same work for both.
    BENCH_AUDIENCES=1000 load "$CEILING" 64 "$SECONDS_PER_RUN" >>"$WORK/ceiling.many"
    broker=$(BENCH_KEYS=1000 BENCH_AUDIENCES=1000 load "$MANY" 64 "$SECONDS_PER_RUN")
    echo "$broker" >>"$WORK/broker.many"
    errors=$(( errors + $(field errors "$broker") + $(field non2xx "$broker") ))
done
c=many
c_rps=$(of ceiling rps); b_rps=$(of broker rps); c_p99=$(of ceiling p99_ms); b_p99=$(of broker p99_ms)
echo "| bare req/s | broker req/s | ratio | bare p99 ms | broker p99 ms | p99 ratio | errors | IdP requests during the runs |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
echo "| $c_rps | $b_rps | $(awk -v b="$b_rps" -v c="$c_rps" 'BEGIN { printf "%.2f", b / c }') | $c_p99 | $b_p99 | $(awk -v b="$b_p99" -v c="$c_p99" 'BEGIN { printf "%.2f", b / c }') | $errors | $(( $(idp_count 9100) - many_before )) |"
kill "$(cat "$WORK/many.pid")"
echo

echo "## Cold fill and memory (fake IdP answering in 50 ms, 256 concurrent callers)"
echo
pid=$(cat "$WORK/hits.pid")
base=$(rss_kib "$pid"); before=$(idp_count 9100); total=0
echo "| cached tokens | fill seconds | IdP requests | RSS MiB | bytes per token |"
echo "| --- | --- | --- | --- | --- |"
from=0
for to in 1000 10000 100000; do
    out=$("$HELPER" fill --url "$HITS" --key "$KEY" --from $from --to $to --concurrency 256)
    failures=$(field failures "$out")
    [ "$failures" = 0 ] || { echo "fill failures: $out" >&2; exit 1; }
    rss=$(rss_kib "$pid")
    requests=$(( $(idp_count 9100) - before ))
    per=$(( (rss - base) * 1024 / to ))
    echo "| $to | $(field seconds "$out") (keys $from-$to) | $requests | $(awk -v r="$rss" 'BEGIN { printf "%.1f", r / 1024 }') | $per |"
    from=$to
done
echo

echo "## Rollover (${ROLLOVER_SECONDS}s at 64 connections; 10 s tokens, min_remaining 2 s, refresh in the last 25%)"
echo
ROLL=http://127.0.0.1:9301/v1/tokens/bench/production
curl -fs -o /dev/null -H "Authorization: Bearer $KEY" "$ROLL"
steady=$(load "$HITS" 64 "$ROLLOVER_SECONDS")
r_before=$(idp_count 9101)
rolling=$(load "$ROLL" 64 "$ROLLOVER_SECONDS")
r_requests=$(( $(idp_count 9101) - r_before ))
echo "| run | req/s | p99 ms | p99.9 ms | max ms | errors | IdP requests |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
echo "| no refresh (1 h tokens) | $(field rps "$steady") | $(field p99_ms "$steady") | $(field p999_ms "$steady") | $(field max_ms "$steady") | $(( $(field errors "$steady") + $(field non2xx "$steady") )) | 0 |"
echo "| refresh every ~8 s | $(field rps "$rolling") | $(field p99_ms "$rolling") | $(field p999_ms "$rolling") | $(field max_ms "$rolling") | $(( $(field errors "$rolling") + $(field non2xx "$rolling") )) | $r_requests |"
