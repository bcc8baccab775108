-- sequential.lua: port-contiguity prediction. Use it against NATs that allocate ports sequentially
-- (symmetric_seq in the lab, many home routers and CGNs): it walks forward from the peer's reflexive
-- port by the observed delta, the next allocation first, and widens the walk with each attempt.
-- It sets no relay fields, so it takes the built-in rule (as default.lua): the relay at once for a pair that cannot
-- be punched, a race after a delay elsewhere, never without a relay.

local function plan(ctx)
    local rtt = ctx.rtt_ms or 100
    local base = ctx.ports[1]
    local remote = ctx.remote_nat
    if base == nil then
        return { rounds = 5 } -- nothing to predict from: the default ports and timing
    end
    local delta = remote.port_delta ~= 0 and remote.port_delta or 1
    local ahead = 16 * ctx.attempt
    -- The NAT's counter stands at the last port it allocated when the peer published it (NAT discovery and other
    -- flows move it after registration); otherwise at the advertised port.
    local counter = ctx.last_allocated_port or base
    -- The allocation just after the advertised one is the most likely; a few before it cover reordering.
    local ports = hp.merge(ctx.ports, hp.sequence(counter + delta, delta, ahead), hp.sequence(counter - delta, -delta, 4))
    local interval = hp.clamp(rtt / 2, 20, 200)
    local packets = math.min(#ports, math.max(1, math.floor(ctx.limits.max_pps * interval / 1000)))
    local rounds = hp.clamp(math.ceil(#ports / packets) + 3, 5, 200)
    return {
        ports = ports,
        packets_per_round = packets,
        interval_ms = interval,
        rounds = rounds,
        timeout_ms = hp.clamp(rounds * interval + 3 * rtt, 2000, 15000),
        connect_timeout_ms = hp.clamp(4 * rtt, 800, 4000),
        start_delay_ms = 0,
        initial_rtt_ms = hp.clamp(rtt * 1.5, 10, 1000),
        dial_direct = remote.mapping == "endpoint_independent",
    }
end

return { name = "sequential", plan = plan }
