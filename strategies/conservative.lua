-- conservative.lua: a low packet rate (at most 4 packets/s). Use it on networks that rate-limit UDP or
-- flag port scans (corporate firewalls, some mobile carriers). It connects more slowly and gives up on
-- random allocation, which cannot be punched without a spray of packets. The relay is its last resort: with one
-- available it starts only when the slow punch's timeout has passed, and a relayed connection keeps probing
-- for a direct path for at most 20 s more, at the same low rate.

local function cone(p) return p.mapping == "endpoint_independent" end

local function plan(ctx)
    local rtt = ctx.rtt_ms or 150
    local remote = ctx.remote_nat
    local base = ctx.ports[1]
    local ports = ctx.ports
    if base and not cone(remote) and remote.allocation ~= "random" then
        local delta = remote.port_delta ~= 0 and remote.port_delta or 1
        ports = hp.merge(ctx.ports, hp.sequence(base + delta, delta, 3))
    end
    local interval = math.max(500, rtt * 2)
    local packets = math.min(2, #ports)
    local rounds = hp.clamp(math.ceil(#ports / packets) * 2, 4, 40)
    local timeout = hp.clamp(rounds * interval + 4 * rtt, 3000, 30000)
    return {
        ports = ports,
        sockets = 1,
        packets_per_round = packets,
        interval_ms = interval,
        rounds = rounds,
        timeout_ms = timeout,
        connect_timeout_ms = hp.clamp(6 * rtt, 1500, 6000),
        start_delay_ms = 0,
        initial_rtt_ms = hp.clamp(rtt * 2, 100, 1000),
        dial_direct = false,
        relay = ctx.relay_available and { after_ms = timeout } or "never",
        direct_after_relay_ms = 20000,
    }
end

return { name = "conservative", plan = plan }
