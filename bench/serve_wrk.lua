-- wrk script of bench/serve_bench.py --wrk (part B): each connection is one
-- client that GETs /api/v1/jobs/{id} of a random one of the jobs every 0.5 s.
--
--   SSHQ_BENCH_TOKEN=sshq_... wrk -t 2 -c 50 -d 30s --latency -s bench/serve_wrk.lua \
--       http://127.0.0.1:PORT -- IDS_FILE CONNECTIONS_PER_THREAD
--
-- IDS_FILE holds the sshq ids, one a line.  The token comes from the
-- environment (not the command line, where `ps` would show it).  A
-- connection's first request waits a random 0-500 ms, so that the clients
-- do not all poll at the same instant; every later one waits 500 ms after
-- the previous response.  wrk's own latency is from a request's first byte
-- written to its response's last byte read.  At the end one line
-- "SSHQ-WRK-JSON {...}" gives the numbers the benchmark reads, including
-- the server's own time per request from its Server-Timing header.

local ids = {}
local auth = "Bearer " .. (os.getenv("SSHQ_BENCH_TOKEN") or "")
local first_delays = 0   -- connections of this thread not yet started
app_ms = {}              -- Server-Timing app;dur of each response (ms) (a global: done() reads it)
not_ok = 0               -- responses other than 200 (a global, as app_ms)
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do
    if line:match("^%d+$") then table.insert(ids, line) end
  end
  assert(#ids > 0, "no job ids in " .. args[1])
  first_delays = tonumber(args[2]) or 0
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
end

function request()
  local id = ids[math.random(#ids)]
  return wrk.format("GET", "/api/v1/jobs/" .. id, {["Authorization"] = auth})
end

function delay()
  if first_delays > 0 then
    first_delays = first_delays - 1
    return math.random(0, 499)
  end
  return 500
end

function response(status, headers, body)
  if status ~= 200 then not_ok = not_ok + 1 end
  local timing = headers["server-timing"] or headers["Server-Timing"]
  if timing then
    local dur = timing:match("dur=([%d.]+)")
    if dur then table.insert(app_ms, tonumber(dur)) end
  end
end

local function quantile(sorted, q)
  if #sorted == 0 then return -1 end
  local i = math.max(1, math.min(#sorted, math.ceil(q * #sorted)))
  return sorted[i]
end

function done(summary, latency, requests)
  local app, bad = {}, 0
  for _, t in ipairs(threads) do
    for _, v in ipairs(t:get("app_ms")) do table.insert(app, v) end
    bad = bad + t:get("not_ok")
  end
  table.sort(app)
  local e = summary.errors
  io.write(string.format(
    'SSHQ-WRK-JSON {"requests": %d, "duration_s": %.3f, "not_200": %d,'
    .. ' "socket_errors": %d, "timeouts": %d,'
    .. ' "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, "mean_ms": %.3f,'
    .. ' "app_samples": %d, "app_p50_ms": %.3f, "app_p99_ms": %.3f, "app_max_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6, bad,
    e.connect + e.read + e.write, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, latency.mean / 1000,
    #app, quantile(app, 0.5), quantile(app, 0.99), app[#app] or -1))
end
