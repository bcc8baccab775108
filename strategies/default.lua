-- default.lua: our best general strategy. Use it unless you have measured that another one does better
-- on your networks.
--
-- * Timing scales with the measured RTT and with history: the interval is about half an RTT, the
--   timeout covers the rounds plus a few RTTs and at least three times the median time-to-connect seen
--   for this NAT pair, and every retry widens it.
-- * Sequential NATs: predicts the peer's next ports from its observed delta, likely-first (the port
--   that won last time, then base+delta, base+2·delta…), plus a small window around its reflexive port. The
--   base is the last port the peer's NAT is known to have allocated (ctx.last_allocated_port) when the peer
--   published it: a NAT whose counter all its mappings share has moved on since registration (NAT discovery
--   alone takes ports), and counting from the registration's port would aim behind the counter.
-- * Random allocation against an endpoint-independent mapping with a port-dependent filter: a birthday search,
--   max_sockets local sockets on the random side, max_ports random probes at max_pps from the other. Against a
--   lenient filter (full cone, restricted) one socket suffices; against another symmetric NAT nothing can aim,
--   so only the known ports are tried (a cheap, clean failure).
-- * Lossy paths: probing lasts at least 2.5 s, and each QUIC handshake datagram is sent twice (three times after
--   failures).
-- * Easy NATs (endpoint-independent mapping on both sides): only the candidate ports, few packets.
-- * The relay (when ctx.relay_available): at once for a pair that cannot be punched (the `hopeless` pair below) or
--   whose NAT-pair history has only failures; elsewhere a race: the relay starts after three times the pair's median
--   time to connect (five RTTs without history), within 1–10 s, so a pair that punches as before never touches it.
--   The punch goes on beside a relayed connection for 30 s (10 s for a hopeless pair). The built-in Swift fallback
--   (DefaultStrategy.relayUse) decides the same.

local function cone(p) return p.mapping == "endpoint_independent" end
-- Our NAT admits the peer from any of its ports once we have sent to its address.
local function lenient(p)
    return cone(p) and (p.filtering == "endpoint_independent" or p.filtering == "address_dependent")
end

local function plan(ctx)
    local rtt = ctx.rtt_ms or 100
    local attempt = ctx.attempt
    local remote, localnat = ctx.remote_nat, ctx.local_nat
    local base = ctx.ports[1]
    -- Where the peer's NAT counter stands: the last port it allocated, else the registration's port.
    local seq_base = ctx.last_allocated_port or base
    local history = ctx.history
    local max_pps = ctx.limits.max_pps

    local ports = {}
    local sockets = 1
    local first = {}

    -- The offset that won last time with this peer (or this NAT pair) goes first.
    local offset = history.peer.last_offset or history.pair.last_offset
    if base and offset and offset ~= 0 then first[1] = base + offset end

    -- Both mappings symmetric and one of them random: the random side's mapping depends on the destination port,
    -- which the other (symmetric) side only picks when it sends, so neither side has a port to aim at. Meeting by
    -- chance would take ~sockets × probes ≈ 64512 × ln(1/(1−p)) packets per side for success p; we do not spray.
    local hopeless = not cone(remote) and not cone(localnat)
        and (remote.allocation == "random" or localnat.allocation == "random")

    if cone(remote) or base == nil or hopeless then
        ports = hp.merge(first, ctx.ports)
    elseif remote.mapping == "unknown" then
        -- Not measured yet (the peer punched before its NAT discovery ended): most NATs map endpoint-independently,
        -- so its known ports go first, then the sequential walk in case it is not. First matters when our own NAT
        -- is symmetric: every port we try takes a fresh mapping, and the peer only looks a few ports ahead of ours.
        local delta = remote.port_delta ~= 0 and remote.port_delta or 1
        ports = hp.merge(first, ctx.ports, hp.sequence(seq_base + delta, delta, 8 * attempt), hp.around(base, 2))
    elseif remote.allocation == "random" and lenient(localnat) then
        -- Their probes to our known port get in wherever their NAT maps them: no need to chase it.
        ports = hp.merge(first, ctx.ports)
    elseif remote.allocation == "random" then
        -- Birthday spray: their side opens n fresh mappings (max_sockets) towards our port; each of our m probes
        -- to a random port of theirs hits one with P ≈ 1 − (1 − n/64512)^m. 256 × 2000 gives > 99.9 %, so
        -- probe as many random ports as the limits allow, at the full rate (see `spray` below).
        local room = ctx.limits.max_ports - #ctx.ports - #first
        ports = hp.merge(first, ctx.ports, hp.random_ports(math.max(1, room), 1024, 65535))
    else
        -- Sequential (or unknown) allocation: walk forward by the delta, widening with each attempt. The
        -- observed port itself is the peer's mapping towards the rendezvous, which its NAT will not reuse for
        -- us: base + delta comes first. When both NATs are sequential this ordering is what makes the two
        -- sides' fresh mappings meet (each side's k-th probe leaves from its base + k·delta towards the other's
        -- base + k·delta), so both sides must use it.
        local delta = remote.port_delta ~= 0 and remote.port_delta or 1
        local ahead = 8 * attempt
        ports = hp.merge(first, hp.sequence(seq_base + delta, delta, ahead), ctx.ports, hp.around(base, 2))
    end

    -- Our own NAT picks a random port per destination, and their NAT filters by port: open as many mappings as
    -- allowed so that their spray meets one. (A lenient peer NAT admits our one mapping from any port.)
    local sprayed = localnat.allocation == "random" and not cone(localnat) and cone(remote) and not lenient(remote)
    if sprayed then sockets = ctx.limits.max_sockets end

    local easy = cone(remote) and cone(localnat)
    -- A birthday search: one side sprays random ports at the other's many fresh mappings.
    local spray = remote.allocation == "random" and not cone(remote) and cone(localnat) and not lenient(localnat)
    local interval = hp.clamp(rtt / 2, easy and 50 or 20, 300)
    local packets = easy and #ports or math.max(1, math.min(#ports, 16))
    -- Stay under the rate cap rather than being clamped: fewer packets per round, same interval.
    local budget = math.floor(max_pps * interval / 1000 / sockets)
    if spray then packets = budget end
    packets = hp.clamp(packets, 1, math.max(1, budget))
    if budget < 1 then interval = math.ceil(1000 * sockets / max_pps) end

    local rounds_needed = math.ceil(#ports / packets) + 2
    local rounds = easy and 3 or hp.clamp(rounds_needed, 5, ctx.limits.max_rounds)
    -- On a lossy path every probe of a short plan can be lost, and the peer may start late (its copy of the
    -- coordinated start crossed the same lossy path and was retransmitted); a side whose rounds run out before it
    -- hears anything gives up (allPortsFailed) while its peer still punches. Keep probing for at least 2.5 s (or
    -- 12 RTTs): on a clean path this costs nothing, since probing stops as soon as the peer answers one probe.
    local window = math.max(2500, 12 * rtt)
    rounds = hp.clamp(math.max(rounds, math.ceil(window / interval)), 1, ctx.limits.max_rounds)
    if sprayed then
        -- Our mappings are what their spray looks for: keep them open (and probing keeps them alive) until the
        -- whole spray, max_ports probes at max_pps, has had time to arrive.
        local spray_ms = 1000 * ctx.limits.max_ports / max_pps + 2 * rtt
        rounds = hp.clamp(math.max(rounds, math.ceil(spray_ms / interval)), 1, ctx.limits.max_rounds)
    end
    local timeout = rounds * interval + 3 * rtt
    if history.pair.median_ttc_ms then timeout = math.max(timeout, 3 * history.pair.median_ttc_ms) end
    timeout = timeout * (1 + 0.5 * (attempt - 1))
    -- The floor leaves room for a lossy path: a QUIC handshake that loses packets recovers by probe timeouts
    -- (initial RTT, then doubling), which needs seconds, not one RTT. Success comes as fast either way.
    timeout = hp.clamp(timeout, easy and 3000 or 4000, 20000)

    -- Each handshake datagram goes out twice: QUIC drops the duplicates, a punch handshake is ~6 datagrams (a few
    -- KB once), and on a lossy path it turns a 36 % per-datagram loss into ~13 %, instead of waiting out probe
    -- timeouts that double each time. After failures with this peer or NAT pair, three copies.
    local failures = (history.peer.attempts - history.peer.successes) + (history.pair.attempts - history.pair.successes)
    local copies = failures > 0 and 3 or 2

    -- The relay: never without one; at once where waiting for the punch only delays the first byte; else a race.
    local relay
    if not ctx.relay_available then
        relay = "never"
    elseif hopeless or (history.pair.attempts >= 2 and history.pair.successes == 0) then
        relay = "first"
    else
        local expected = history.pair.median_ttc_ms or 5 * rtt
        relay = { after_ms = hp.clamp(3 * expected, 1000, 10000) }
    end

    return {
        ports = ports,
        sockets = sockets,
        packets_per_round = packets,
        interval_ms = interval,
        rounds = rounds,
        timeout_ms = timeout,
        connect_timeout_ms = hp.clamp(8 * rtt, 1500, 5000),
        start_delay_ms = 0,
        initial_rtt_ms = hp.clamp(rtt * 1.5, 10, 1000),
        dial_direct = cone(remote),
        handshake_copies = math.min(copies, math.max(1, ctx.limits.max_handshake_copies)),
        relay = relay,
        direct_after_relay_ms = hopeless and 10000 or 30000,
    }
end

return { name = "default", plan = plan }
