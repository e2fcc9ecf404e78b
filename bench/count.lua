-- wrk script of bench/instructions.sh: requests rotate over BENCH_KEYS caller keys
-- (`tbk_bench-caller-1` … `tbk_bench-caller-N`, or BENCH_KEY when BENCH_KEYS is unset) and over
-- BENCH_AUDIENCES cached keys (`?audience=urn:bench:0` … `urn:bench:M-1`, the keys of
-- `bench fill`; the environment's default audience when unset). Request n comes from caller
-- n mod BENCH_KEYS for key n mod BENCH_AUDIENCES: each caller keeps to its key, as services do,
-- so the audit trail's line for each first hand-out is written during the warm-up. The summary
-- is the number of answers, to divide the instruction count by.
local callers = tonumber(os.getenv("BENCH_KEYS") or "0")
local audiences = tonumber(os.getenv("BENCH_AUDIENCES") or "0")
local n = 0

request = function()
  local key = os.getenv("BENCH_KEY")
  local path = wrk.path
  if callers > 0 then
    key = "tbk_bench-caller-" .. (n % callers + 1)
  end
  if audiences > 0 then
    path = path .. "?audience=urn:bench:" .. (n % audiences)
  end
  n = n + 1
  return wrk.format(nil, path, { ["Authorization"] = "Bearer " .. key })
end

done = function(summary, latency, requests)
  io.write(string.format("REQUESTS %d non2xx=%d\n", summary.requests, summary.errors.status))
end
