-- wrk script of bench/instructions.sh: requests rotate over BENCH_KEYS caller keys
-- (`tbk_bench-caller-1` … `tbk_bench-caller-N`, or BENCH_KEY when BENCH_KEYS is unset), and the
-- summary is the number of answers, to divide the instruction count by.
local count = tonumber(os.getenv("BENCH_KEYS") or "0")
local n = 0

request = function()
  local key = os.getenv("BENCH_KEY")
  if count > 0 then
    n = n % count + 1
    key = "tbk_bench-caller-" .. n
  end
  return wrk.format(nil, nil, { ["Authorization"] = "Bearer " .. key })
end

done = function(summary, latency, requests)
  io.write(string.format("REQUESTS %d non2xx=%d\n", summary.requests, summary.errors.status))
end
