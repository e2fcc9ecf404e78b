-- wrk script of bench/run.sh: the caller key header and a one-line summary with p99.9. With
-- BENCH_KEYS and BENCH_AUDIENCES set, requests rotate over that many callers and cached keys, as
-- in bench/count.lua.
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
local callers = tonumber(os.getenv("BENCH_KEYS") or "0")
local audiences = tonumber(os.getenv("BENCH_AUDIENCES") or "0")

-- The requests are built once, in `init`, and `request` hands them out in turn: building each
-- one in Lua costs wrk more than a hit costs the server, and would make the load generator, not
-- the server, what is measured.
if callers > 0 or audiences > 0 then
  local requests = {}
  local count = 0
  local n = 0

  init = function(args)
    local cycle = math.max(callers, audiences, 1)
    if callers > 0 and audiences > 0 then
      local a, b = callers, audiences
      while b > 0 do a, b = b, a % b end
      cycle = callers / a * audiences
    end
    for i = 0, cycle - 1 do
      local headers = { ["Authorization"] = wrk.headers["Authorization"] }
      local path = wrk.path
      if callers > 0 then
        headers["Authorization"] = "Bearer tbk_bench-caller-" .. (i % callers + 1)
      end
      if audiences > 0 then
        path = path .. "?audience=urn:bench:" .. (i % audiences)
      end
      requests[i + 1] = wrk.format(nil, path, headers)
    end
    count = cycle
  end

  request = function()
    n = n % count + 1
    return requests[n]
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
