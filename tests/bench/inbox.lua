-- wrk script for tests/bench/bench_inbox.py: POST pre-signed activities to /inbox.
--
--   wrk -t T -c C -d D -s inbox.lua URL -- PREFIX WINDOW HOST
--
-- Thread k reads PREFIX<k>.tsv (one request a line: date, digest, signature, body,
-- tab-separated), builds every request once in init(), and sends each at most once,
-- so every activity id is distinct. After WINDOW seconds (or when its slice runs
-- out) a connection waits (delay()) until wrk's -d (longer than WINDOW) runs out, so
-- the POSTs still in flight are answered and counted. done() prints one line per
-- thread that bench_inbox.py parses.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]
local timespec = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, timespec) -- CLOCK_MONOTONIC
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) * 1e-9
end

local threads = {}

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

function init(args)
  local prefix, host = args[1], args[3]
  window = tonumber(args[2])
  requests = {}
  for line in io.lines(prefix .. thread_index .. ".tsv") do
    local date, digest, signature, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
    requests[#requests + 1] = wrk.format("POST", "/inbox", {
      ["Host"] = host,
      ["Date"] = date,
      ["Digest"] = digest,
      ["Signature"] = signature,
      ["Content-Type"] = "application/activity+json",
    }, body)
  end
  pool = #requests
  idle = wrk.format("GET", "/.well-known/nodeinfo", { ["Host"] = host })
  sent, started, stopped, primed = 0, 0, 0, false
  inbox_statuses = {} -- status -> count, POST answers only
  idle_answers = 0
end

function request()
  if not primed then
    -- wrk calls request() once before the run and throws the answer away.
    primed = true
    return idle
  end
  if stopped == 0 then
    local t = now()
    if started == 0 then
      started = t
    end
    if sent < #requests and t - started < window then
      sent = sent + 1
      return requests[sent]
    end
    stopped = t
  end
  return idle
end

function delay()
  -- Past the window (or the slice), a connection sleeps out the rest of wrk's -d: the
  -- POSTs in flight are still answered and counted, and the latency figures are theirs.
  if stopped == 0 and started ~= 0 and (sent >= #requests or now() - started >= window) then
    stopped = now()
  end
  if stopped ~= 0 then
    return 600000
  end
  return 0
end

function response(status, headers, body)
  -- The GET answers JSON; every inbox answer is empty (202) or text/plain.
  local kind = headers["content-type"] or headers["Content-Type"] or ""
  if kind:find("json", 1, true) then
    idle_answers = idle_answers + 1
  else
    inbox_statuses[status] = (inbox_statuses[status] or 0) + 1
  end
end

function done(summary, latency, reqs)
  for _, thread in ipairs(threads) do
    local statuses = thread:get("inbox_statuses")
    local parts = {}
    for status, count in pairs(statuses) do
      parts[#parts + 1] = status .. ":" .. count
    end
    io.write(string.format(
      "BENCH thread=%d sent=%d pool=%d window=%.6f idle=%d statuses=%s\n",
      thread:get("thread_index"), thread:get("sent"), thread:get("pool"),
      thread:get("stopped") - thread:get("started"), thread:get("idle_answers"),
      table.concat(parts, ",")))
  end
  io.write(string.format("BENCH latency p50=%.1fms p99=%.1fms max=%.1fms\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
