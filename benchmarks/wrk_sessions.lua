-- wrk script: POST MCP requests spread over pre-created sessions and check every answer.
--
--   wrk -t1 -c64 -d10s -s wrk_sessions.lua http://127.0.0.1:8080 -- SESSIONS_FILE [json|sse] [PATH] [close]
--
-- SESSIONS_FILE has one "<session id> <owner backend>" per line (the owner is the X-Backend the
-- backend answered initialize with). Each thread walks the sessions round robin from its own offset.
-- Every response is counted: non-2xx, and affinity errors (its X-Backend is not the owner recorded
-- for the session it echoes in Mcp-Session-Id). done() prints one line "WRK_RESULT {json}".
-- With "close", every request says `Connection: close`: a new connection (over https, a new TLS
-- handshake) per request.

local body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"x":1}}}'
local prepared = {}
local owner_of = {}
local cursor = 0
local threads = {}

-- Globals (not locals) so that done() can read them from every thread with thread:get().
responses = 0
bad_status = 0
bad_affinity = 0

function setup(thread)
  thread:set("thread_id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  local file, mode, path, connection = args[1], args[2] or "json", args[3] or "/mcp", args[4]
  if mode == "sse" then
    path = path .. "?sse=1"
  end
  local headers = {
    ["Content-Type"] = "application/json",
    ["Accept"] = "application/json, text/event-stream",
    ["MCP-Protocol-Version"] = "2025-06-18",
  }
  if connection == "close" then
    headers["Connection"] = "close"
  end
  for line in io.lines(file) do
    local sid, owner = line:match("^(%S+)%s+(%S+)$")
    if sid then
      owner_of[sid] = owner
      headers["Mcp-Session-Id"] = sid
      prepared[#prepared + 1] = wrk.format("POST", path, headers, body)
    end
  end
  if #prepared == 0 then
    error("no sessions in " .. tostring(file))
  end
  -- Spread the threads over the session list.
  cursor = ((thread_id or 1) * 7919) % #prepared
end

function request()
  cursor = cursor % #prepared + 1
  return prepared[cursor]
end

function response(status, headers, _)
  responses = responses + 1
  if status < 200 or status > 299 then
    bad_status = bad_status + 1
  end
  -- HAProxy lower-cases header names; the stub and mcpbalancer keep "Mcp-Session-Id" / "X-Backend".
  local sid = headers["Mcp-Session-Id"] or headers["mcp-session-id"]
  local backend = headers["X-Backend"] or headers["x-backend"]
  if sid == nil or backend == nil or owner_of[sid] ~= backend then
    bad_affinity = bad_affinity + 1
  end
end

function done(summary, latency, _)
  local total_responses, total_status, total_affinity = 0, 0, 0
  for _, thread in ipairs(threads) do
    total_responses = total_responses + thread:get("responses")
    total_status = total_status + thread:get("bad_status")
    total_affinity = total_affinity + thread:get("bad_affinity")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"responses":%d,"bad_status":%d,"bad_affinity":%d,'
      .. '"socket_errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, total_responses, total_status, total_affinity,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)
  ))
end
