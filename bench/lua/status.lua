-- Count responses by status code; print "STATUS <code> <count>" lines when wrk is done.
-- wrk itself only reports "Non-2xx or 3xx responses": this tells a 200 from a 304, a 401
-- from a 502. tokens.lua and upload.lua load this file too.
local threads = {}
counts = {}

function setup(thread)
  table.insert(threads, thread)
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("counts")) do
      io.write(string.format("STATUS %d %d\n", status, n))
    end
  end
end
