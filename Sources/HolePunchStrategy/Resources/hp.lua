-- The strategy helper library `hp`, run in every strategy's sandboxed state before the strategy itself
-- (see LuaEngine.swift). It is ordinary Lua under the same limits as the strategy: its loops count against the
-- instruction budget and its tables against the memory cap, so it needs no limits of its own. What must be
-- C stays in hp_lua.c: `hp.log` (it calls the host) and the generator behind `math.random`.
--
-- The chunk's one argument is a table from legacy NAT type name to difficulty, built from Swift's
-- `NATType.difficulty`, so the ranking has one source.

local nat_rank = ...

-- Captured now, before any strategy runs: a strategy that replaces a global cannot change what hp does.
local hp, error, type, select, rawget, rawlen = hp, error, type, select, rawget, rawlen
local format, tointeger, mathtype, random = string.format, math.tointeger, math.type, math.random
local tonumber, getmetatable = tonumber, getmetatable

-- A port list is never longer than this (the same bound the plan conversion applies).
local max_list = 65536
-- Bases and bounds beyond ±2^40 are refused: no port arithmetic needs them, and they keep products exact.
local max_base = 1 << 40

-- Raises Lua's usual argument error, positioned at the strategy's line that called the helper (`level` counts
-- from argerror itself: 3 is the caller of the helper that called argerror).
local function argerror(n, fname, msg, level)
    error(format("bad argument #%d to '%s' (%s)", n, fname, msg), level or 3)
end

-- What Lua's own messages call a missing argument. An explicit nil is reported the same way (the C helpers
-- said "nil"): telling them apart would cost every call a vararg count.
local function typename(v)
    return v == nil and "no value" or type(v)
end

-- luaL_checkinteger: integers, floats with an exact integer value and numeric strings.
local function checkinteger(v, n, fname)
    local i = tointeger(v)
    if i == nil then
        if type(v) == "number" then
            error(format("bad argument #%d to '%s' (number has no integer representation)", n, fname), 3)
        end
        error(format("bad argument #%d to '%s' (number expected, got %s)", n, fname, typename(v)), 3)
    end
    return i
end

local function checknumber(v, n, fname)
    local x = (type(v) == "number" or type(v) == "string") and tonumber(v) or nil
    if x == nil then
        error(format("bad argument #%d to '%s' (number expected, got %s)", n, fname, typename(v)), 3)
    end
    return x
end

local function is_port(p)
    return p >= 1 and p <= 65535
end


--- `{lo, lo+step, …, hi}`; counts down when lo > hi; at most 65536 elements.
function hp.range(lo, hi, step)
    lo = checkinteger(lo, 1, "range")
    hi = checkinteger(hi, 2, "range")
    if step == nil then step = lo <= hi and 1 or -1 else step = checkinteger(step, 3, "range") end
    if step == 0 then argerror(3, "range", "step must not be zero") end
    if not (lo > -max_base and lo < max_base) then argerror(1, "range", "out of range") end
    if not (hi > -max_base and hi < max_base) then argerror(2, "range", "out of range") end
    local t = {}
    if (step > 0 and lo > hi) or (step < 0 and lo < hi) then return t end
    local dist = hi > lo and hi - lo or lo - hi
    local astep = step > 0 and step or -step
    -- -math.mininteger wraps to itself; a step that large reaches no second element anyway.
    local count = astep > 0 and dist // astep + 1 or 1
    if count > max_list then
        error(format("hp.range: %d elements requested, at most %d allowed", count, max_list), 2)
    end
    local n = 0
    for p = lo, lo + (count - 1) * step, step do
        n = n + 1
        t[n] = p
    end
    return t
end

--- `{base, base+1, base-1, base+2, base-2, …}` up to ±radius, nearest first; non-ports skipped.
function hp.around(base, radius)
    base = checkinteger(base, 1, "around")
    radius = checkinteger(radius, 2, "around")
    if not (radius >= 0 and radius < max_list // 2) then argerror(2, "around", "radius must be in 0...32767") end
    local t, n = {}, 0
    if is_port(base) then
        n = 1
        t[1] = base
    end
    for d = 1, radius do
        local p = base + d
        if p >= 1 and p <= 65535 then n = n + 1; t[n] = p end
        p = base - d
        if p >= 1 and p <= 65535 then n = n + 1; t[n] = p end
    end
    return t
end

--- `{base, base+delta, …}`, count values (delta may be negative); non-ports skipped.
function hp.sequence(base, delta, count)
    base = checkinteger(base, 1, "sequence")
    delta = checkinteger(delta, 2, "sequence")
    count = checkinteger(count, 3, "sequence")
    if not (count >= 0 and count <= max_list) then argerror(3, "sequence", "count must be in 0...65536") end
    if not (delta > -max_list and delta < max_list) then argerror(2, "sequence", "delta out of range") end
    if not (base > -max_base and base < max_base) then argerror(1, "sequence", "out of range") end
    local t, n, p = {}, 0, base
    for _ = 1, count do
        if p >= 1 and p <= 65535 then n = n + 1; t[n] = p end
        p = p + delta
    end
    return t
end

--- count distinct random ports in lo…hi (default 1024…65535), drawn from the call's generator: the same
--- draws as `math.random(lo, hi)`, so a plan stays deterministic for `ctx.seed`.
function hp.random_ports(count, lo, hi)
    count = checkinteger(count, 1, "random_ports")
    lo = lo == nil and 1024 or checkinteger(lo, 2, "random_ports")
    hi = hi == nil and 65535 or checkinteger(hi, 3, "random_ports")
    if not is_port(lo) then argerror(2, "random_ports", "must be a port (1...65535)") end
    if not (is_port(hi) and hi >= lo) then argerror(3, "random_ports", "must be a port not below lo") end
    if not (count >= 0 and count <= hi - lo + 1) then
        argerror(1, "random_ports", "more ports requested than the range holds")
    end
    local t, seen, n = {}, {}, 0
    -- The loops below are written out in full: a function call per port would cost more than the work.
    while n < count do
        local p = random(lo, hi)
        if not seen[p] then seen[p] = true; n = n + 1; t[n] = p end
    end
    return t
end

--- The lists concatenated, duplicates dropped, first position kept.
function hp.merge(...)
    local nargs = select("#", ...)
    local lists = { ... }
    for a = 1, nargs do
        if type(lists[a]) ~= "table" then
            argerror(a, "merge", "table expected, got " .. typename(lists[a]))
        end
    end
    local t, seen, n = {}, {}, 0
    for a = 1, nargs do
        local list = lists[a]
        -- Elements are read raw; plain indexing is the same, and faster, on a list without a metatable.
        local raw = getmetatable(list) ~= nil
        for i = 1, rawlen(list) do
            local p
            if raw then p = rawget(list, i) else p = list[i] end
            if mathtype(p) ~= "integer" then p = tointeger(p) end
            if p == nil or p < 1 or p > 65535 then
                error(format("hp.merge: argument %d, element %d is not a port (1...65535)", a, i), 2)
            end
            if not seen[p] then seen[p] = true; n = n + 1; t[n] = p end
        end
    end
    return t
end

--- x limited to lo…hi: an integer when all three are integers, NaN gives lo.
function hp.clamp(x, lo, hi)
    local all_int = mathtype(x) == "integer" and mathtype(lo) == "integer" and mathtype(hi) == "integer"
    x = checknumber(x, 1, "clamp")
    lo = checknumber(lo, 2, "clamp")
    hi = checknumber(hi, 3, "clamp")
    if not (lo <= hi) then argerror(3, "clamp", "hi must not be below lo") end
    if x ~= x then x = lo end
    local r = x < lo and lo or (x > hi and hi or x)
    -- Mixed arguments give a float, as Lua's arithmetic would.
    if all_int then return r end
    return r + 0.0
end

-- A legacy NAT type name, from a name or a profile table (its `type` field).
local function nat_arg(v, n)
    local from_table = type(v) == "table"
    if from_table then v = rawget(v, "type") end
    if type(v) ~= "string" and type(v) ~= "number" then
        -- A profile without a type field holds nil, which was given: not "no value".
        local got = from_table and type(v) or typename(v)
        error(format("bad argument #%d to 'worst_nat' (string expected, got %s)", n, got), 3)
    end
    if nat_rank[v] == nil then argerror(n, "worst_nat", "not a NAT type name", 4) end
    return v
end

--- The harder of two NAT types (names or profile tables): the worse NAT of a pair picks the timing row.
function hp.worst_nat(a, b)
    a = nat_arg(a, 1)
    b = nat_arg(b, 2)
    return nat_rank[a] >= nat_rank[b] and a or b
end

hp.version = 1
