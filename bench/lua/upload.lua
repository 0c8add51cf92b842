-- POST a 1 MiB body (other headers, such as Authorization, come from wrk -H), and count statuses.
dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "status.lua")

wrk.method = "POST"
wrk.body = string.rep("x", 1048576)
wrk.headers["Content-Type"] = "application/octet-stream"
