import HolePunchNet

/// The ranges every value of the rendezvous protocol must lie in. Both sides check them where a message is
/// decoded (`RendezvousFraming/decode(_:from:)`), so a value outside them never reaches a planner, a timer or a
/// log line: the message is refused with ``RendezvousError/Code/protocolViolation``.
package enum RendezvousMessageLimits {
    /// Most candidates one registration may publish: `HostCandidates.maxPerFamily` host addresses of each family,
    /// a `srflx` address of the other family and a few router mappings, with room to spare.
    package static let maxPublishedCandidates = 12
    /// Most candidates in a coordinate message: the observed address plus the published ones.
    package static let maxCandidates = 1 + maxPublishedCandidates
    /// Most STUN addresses a `Registered` may advertise: one per family, with room for an alternate.
    package static let maxSTUNServers = 4
    /// Session ids: 1 to 64 characters of `[0-9A-Za-z-]` (the server draws 32 lowercase hex digits); they appear
    /// in probe USERNAMEs (where `:` separates) and in TLS server names.
    package static let maxSessionIDLength = 64
    /// Session keys: the server draws 32 bytes; 16...64 are accepted.
    package static let sessionKeyLength = 16...64
    /// The longest start delay a coordinate may ask for: 10 s.
    package static let maxStartDelayMicroseconds: Int64 = 10_000_000
    /// The largest RTT hint: 60 s.
    package static let maxRTTMicroseconds: Int64 = 60_000_000
    /// Registration TTLs from 100 ms (tests run short ones) to a day.
    package static let ttlMilliseconds = 100...86_400_000
    /// Longest error code or outcome string, in UTF-8 bytes.
    package static let maxCodeLength = 64
    /// Longest error message, in UTF-8 bytes.
    package static let maxMessageLength = 1024
    /// A `mapped` candidate's protocol name: 1 to 16 bytes of `[a-z0-9-]` (`pcp`, `natpmp`, `upnp` today).
    package static let maxMappingProtocolLength = 16
    /// A `mapped` candidate's lease: 1 s to a week (UPnP's "0 = forever" is published as the longest).
    package static let mappingLifetimeSeconds: ClosedRange<UInt32> = 1...604_800

    static func violation(_ field: String, _ detail: String) -> RendezvousError {
        RendezvousError(.protocolViolation, "field \(field): \(detail)")
    }

    static func check<T: Comparable & CustomStringConvertible>(
        _ field: String, _ value: T, _ range: ClosedRange<T>
    ) throws(RendezvousError) {
        guard range.contains(value) else {
            throw violation(field, "\(value) is outside \(range.lowerBound)...\(range.upperBound)")
        }
    }

    static func checkSessionID(_ id: String) throws(RendezvousError) {
        let bytes = id.utf8
        try check("sessionID length", bytes.count, 1...maxSessionIDLength)
        let allowed = bytes.allSatisfy { b in
            (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b) || (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b)
                || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(b) || b == UInt8(ascii: "-")
        }
        guard allowed else { throw violation("sessionID", "only letters, digits and '-' are allowed") }
    }

    /// Most `relay` candidates one registration or coordinate may carry: one per granted TURN server
    /// (`TURNGrant.maximumServers`). Which relayed addresses a peer may publish is the server's decision, against its
    /// own TURN servers (`RendezvousState.register(node:connection:observed:registration:stunServer:stunServers:relayServers:now:)`).
    package static let maxRelayedCandidates = TURNGrant.maximumServers

    /// Checks a candidate list: its count, no `prflx` (a peer learns those, never publishes them), at most
    /// ``maxRelayedCandidates`` `relay` candidates (a peer publishes the addresses it allocated) and each priority within its kind's band (`typePreference << 24` plus a 24-bit rest), so that no
    /// candidate claims a better kind than it has.
    static func check(candidates: [Candidate], field: String, count: ClosedRange<Int>) throws(RendezvousError) {
        try check("\(field) count", candidates.count, count)
        try check("\(field) relay count", candidates.count { $0.kind == .relayed }, 0...maxRelayedCandidates)
        for candidate in candidates {
            guard candidate.kind != .peerReflexive else {
                throw violation(field, "a peer may not publish a \(candidate.kind) candidate")
            }
            let base = candidate.kind.typePreference << 24
            try check("\(field) priority", candidate.priority, base...(base | 0xFF_FFFF))
            if let mapping = candidate.mapping { try check(mapping, of: candidate, field: field) }
        }
    }

    /// A mapping description belongs to a `mapped` candidate only, and its protocol name and lease are bounded:
    /// they reach strategies (`ctx.candidates[i].protocol`, `.lease`) and log lines.
    static func check(_ mapping: Candidate.Mapping, of candidate: Candidate, field: String) throws(RendezvousError) {
        guard candidate.kind == .portMapped else {
            throw violation(field, "a \(candidate.kind) candidate carries no mapping")
        }
        let name = mapping.protocolName.utf8
        try check("\(field) mapping protocol length", name.count, 1...maxMappingProtocolLength)
        guard name.allSatisfy({ (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0)
            || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) || $0 == UInt8(ascii: "-") }) else {
            throw violation("\(field) mapping protocol", "only lowercase letters, digits and '-' are allowed")
        }
        try check("\(field) mapping lifetime", mapping.lifetimeSeconds, mappingLifetimeSeconds)
    }

    static func check(_ nat: NATProfile) throws(RendezvousError) {
        try check("portDelta", nat.portDelta, -NATProfile.maxPortDelta...NATProfile.maxPortDelta)
        guard nat.confidence.isFinite, (0...1).contains(nat.confidence) else {
            throw violation("confidence", "\(nat.confidence) is not in 0...1")
        }
    }
}
