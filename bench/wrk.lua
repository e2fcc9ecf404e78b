-- wrk script of bench/run.sh: the caller key header and a one-line summary with p99.9. With
-- BENCH_KEYS and BENCH_AUDIENCES set, requests rotate over that many callers and cached keys, as
-- in bench/count.lua.
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
local callers = tonumber(os.getenv("BENCH_KEYS") or "0")
local audiences = tonumber(os.getenv("BENCH_AUDIENCES") or "0")
local n = 0

if callers > 0 or audiences > 0 then
  request = function()
    local headers = { ["Authorization"] = wrk.headers["Authorization"] }
    local path = wrk.path
    if callers > 0 then
      headers["Authorization"] = "Bearer tbk_bench-caller-" .. (n % callers + 1)
    end
    if audiences > 0 then
      path = path .. "?audience=urn:bench:" .. (n % audiences)
    end
    n = n + 1
    return wrk.format(nil, path, headers)
  end
end

done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout
  io.write(string.format(
    "RESULT rps=%.0f p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f max_ms=%.3f errors=%d non2xx=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency:percentile(99.9) / 1000, latency.max / 1000,
    errors, summary.errors.status))
end
