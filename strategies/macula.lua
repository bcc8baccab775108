-- macula.lua: a faithful reproduction of the seed, macula_hole_punch (hex package macula 0.20.5).
--
-- When to use it: as the baseline in benchmarks and lab matrices, to measure how much better the other
-- strategies are. Do not use it in production: it keeps the seed's behaviour, weaknesses included:
--   * the worst-NAT timing table (1000/800 ms with 1 port, 2000/1500 ms with 3, 4000/3000 ms with 5);
--   * the documented cadence (50/100/150 ms initial delay, 100/200/300 ms interval, 3/5/7 retries);
--   * ports tried in ascending order, and only the first N of them;
--   * no use of the measured RTT, the attempt number, history or role;
--   * macula's connector order: direct, punch, then relay. The relay starts only when the punch's timeout has passed
--     (when ctx.relay_available; the target, whose rounds end earlier, keeps accepting that relayed dial after its
--     punch: docs/strategies.md), and a relayed connection stays relayed (direct_after_relay_ms = 0): macula never
--     upgraded a relayed connection.
-- What the Swift core fixes regardless of the strategy (same socket, peer verification) is not modelled.

local TIMING = {
    symmetric = { timeout = 4000, connect = 3000, ports = 5 },
    full_cone = { timeout = 1000, connect = 800, ports = 1 },
    other     = { timeout = 2000, connect = 1500, ports = 3 },
}

local CADENCE = {
    full_cone  = { delay = 50,  interval = 100, retries = 3 },
    restricted = { delay = 100, interval = 200, retries = 5 },
    symmetric  = { delay = 150, interval = 300, retries = 7 },
}

local function timing_row(l, r)
    if l == "symmetric" or r == "symmetric" then return TIMING.symmetric end
    if l == "full_cone" and r == "full_cone" then return TIMING.full_cone end
    return TIMING.other
end

local function cadence_row(worst)
    if worst == "full_cone" then return CADENCE.full_cone end
    if worst == "symmetric" then return CADENCE.symmetric end
    return CADENCE.restricted
end

local function plan(ctx)
    local l, r = ctx.local_nat.type, ctx.remote_nat.type
    local row = timing_row(l, r)
    local cad = cadence_row(hp.worst_nat(l, r))

    -- The seed's candidate list: the target ports plus, for a symmetric peer, the ports after the first
    -- one. It sorts them ascending and keeps the first N: the likely next port is often dropped.
    local candidates = {}
    for i, p in ipairs(ctx.ports) do candidates[i] = p end
    if r == "symmetric" and ctx.ports[1] then
        for k = 1, row.ports do candidates[#candidates + 1] = ctx.ports[1] + k end
    end
    candidates = hp.merge(candidates)
    table.sort(candidates)
    local ports = {}
    for i = 1, math.min(row.ports, #candidates) do ports[i] = candidates[i] end

    return {
        ports = ports,
        sockets = 1,
        packets_per_round = row.ports,
        interval_ms = cad.interval,
        rounds = cad.retries,
        timeout_ms = row.timeout,
        connect_timeout_ms = row.connect,
        start_delay_ms = cad.delay,
        initial_rtt_ms = 333,
        dial_direct = true,
        relay = ctx.relay_available and { after_ms = row.timeout } or "never",
        direct_after_relay_ms = 0,
    }
end

return { name = "macula", plan = plan }
