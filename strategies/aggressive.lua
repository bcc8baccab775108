-- aggressive.lua: fastest to connect, at the price of more packets. Use it on networks you control (or
-- the lab) when connection time matters more than traffic, e.g. interactive sessions between known
-- peers. It probes wide windows at the highest rate the core allows, from the first millisecond.
-- With a relay available it connects through it at once (relay = "first") and keeps punching beside the relayed
-- connection for 60 s: the first byte never waits for the punch, and the connection moves once a path is proven.

local function cone(p) return p.mapping == "endpoint_independent" end

local function plan(ctx)
    local rtt = ctx.rtt_ms or 50
    local remote, localnat = ctx.remote_nat, ctx.local_nat
    local base = ctx.ports[1]
    local ports
    if base == nil or cone(remote) then
        ports = hp.merge(ctx.ports, base and hp.around(base, 2) or {})
    elseif remote.allocation == "random" then
        ports = hp.merge(ctx.ports, hp.random_ports(1024, 1024, 65535))
    else
        local delta = remote.port_delta ~= 0 and remote.port_delta or 1
        ports = hp.merge(ctx.ports, hp.sequence(base + delta, delta, 32), hp.around(base, 16))
    end
    local sockets = 1
    if not cone(localnat) and localnat.allocation == "random" then sockets = ctx.limits.max_sockets end

    local interval = 20
    -- Use the whole rate budget: packets × sockets per 20 ms round.
    local packets = math.max(1, math.floor(ctx.limits.max_pps * interval / 1000 / sockets))
    if packets * sockets * 1000 / interval > ctx.limits.max_pps then
        interval = math.ceil(1000 * sockets * packets / ctx.limits.max_pps)
    end
    packets = math.min(packets, #ports)
    local rounds = hp.clamp(math.ceil(#ports / packets) * 2, 10, 1000)
    return {
        ports = ports,
        sockets = sockets,
        packets_per_round = packets,
        interval_ms = interval,
        rounds = rounds,
        timeout_ms = hp.clamp(rounds * interval + 2 * rtt, 1000, 15000),
        connect_timeout_ms = hp.clamp(3 * rtt, 500, 3000),
        start_delay_ms = 0,
        initial_rtt_ms = hp.clamp(rtt, 10, 500),
        dial_direct = true,
        relay = ctx.relay_available and "first" or "never",
        direct_after_relay_ms = 60000,
    }
end

return { name = "aggressive", plan = plan }
