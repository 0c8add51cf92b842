-- Cycle through distinct tokens, one a line in the file given after `--`, round-robin, and
-- count statuses. Every request is formatted once, in init: wrk pays nothing per request.
dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "status.lua")

local reqs = {}
local n = 0
local i = 0

function init(args)
  local path = args[1]
  if not path then error("usage: wrk ... -s tokens.lua URL -- TOKENS_FILE") end
  for line in io.lines(path) do
    if #line > 0 then
      n = n + 1
      reqs[n] = wrk.format(nil, nil, {["Authorization"] = "Bearer " .. line})
    end
  end
  if n == 0 then error("no tokens in " .. path) end
end

function request()
  i = i % n + 1
  return reqs[i]
end
