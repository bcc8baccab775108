-- birthday.lua: many local sockets plus random remote ports (a birthday attack). Use it when one side
-- is behind a NAT with random port allocation (symmetric_random in the lab): our random side opens many
-- mappings towards the peer's known port; against their random side we spray random ports, so that some
-- probe meets one of their fresh mappings. It sends many packets; the core's rate cap still applies.
-- It sets no relay fields, so it takes the built-in rule (as default.lua): the relay at once for a pair that cannot
-- be punched, a race after a delay elsewhere, never without a relay.

local function random_side(p)
    return p.mapping ~= "endpoint_independent" and p.allocation == "random"
end

local function plan(ctx)
    local rtt = ctx.rtt_ms or 100
    local max_pps = ctx.limits.max_pps
    local ours, theirs = random_side(ctx.local_nat), random_side(ctx.remote_nat)
    local sockets = ours and ctx.limits.max_sockets or 1
    local ports = ctx.ports
    if theirs then
        ports = hp.merge(ctx.ports, hp.random_ports(hp.clamp(512 * ctx.attempt, 512, 2000), 1024, 65535))
    end
    -- Spread the rate budget: packets × sockets per round must stay under max_pps.
    local interval = 100
    local packets = math.floor(max_pps * interval / 1000 / sockets)
    if packets < 1 then
        packets = 1
        interval = math.ceil(1000 * sockets / max_pps)
    end
    packets = math.min(packets, #ports)
    local rounds = hp.clamp(math.ceil(#ports / packets) + 5, 10, 1000)
    return {
        ports = ports,
        sockets = sockets,
        packets_per_round = packets,
        interval_ms = interval,
        rounds = rounds,
        timeout_ms = hp.clamp(rounds * interval + 4 * rtt, 3000, 20000),
        connect_timeout_ms = hp.clamp(4 * rtt, 1000, 5000),
        start_delay_ms = 0,
        initial_rtt_ms = hp.clamp(rtt * 1.5, 10, 1000),
        dial_direct = false,
    }
end

return { name = "birthday", plan = plan }
