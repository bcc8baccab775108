import HolePunchNet
import HolePunchPortMapping
import Testing

/// A MAP response as a router would write it; each field can be made to lie.
func pcpMapResponse(
    nonce: [UInt8], result: UInt8 = 0, lifetime: UInt32 = 3600, epoch: UInt32 = 100, protocolNumber: UInt8 = 17,
    internalPort: UInt16 = 4000, externalPort: UInt16 = 40000, external: [UInt8] = PCP.encode(.v4(203, 0, 113, 10)),
    version: UInt8 = 2, opcode: UInt8 = 0x81
) -> [UInt8] {
    var bytes: [UInt8] = [version, opcode, 0, result]
    bytes += be(lifetime) + be(epoch) + [UInt8](repeating: 0, count: 12)
    bytes += nonce + [protocolNumber, 0, 0, 0] + be(internalPort) + be(externalPort) + external
    return bytes
}

/// An unsolicited ANNOUNCE (RFC 6887 §14.1.3): opcode 0 with R set, SUCCESS, lifetime 0.
func pcpAnnounce(epoch: UInt32 = 0) -> [UInt8] {
    [2, 0x80, 0, 0] + be(UInt32(0)) + be(epoch) + [UInt8](repeating: 0, count: 12)
}

func be<T: FixedWidthInteger>(_ value: T) -> [UInt8] { withUnsafeBytes(of: value.bigEndian) { Array($0) } }

let gatewayIP = SocketAddress.IP.v4(10, 0, 1, 1)
let gatewayPCP = SocketAddress(ip: gatewayIP, port: 5351)
let clientIP = SocketAddress.IP.v4(10, 0, 1, 2)
let nonce: [UInt8] = Array(1...12)

func machine() -> PCPMapClient {
    var configuration = PCPMapClient.Configuration()
    configuration.jitter = { 0 }
    return PCPMapClient(gateway: gatewayIP, client: clientIP, internalPort: 4000, nonce: nonce, configuration: configuration)
}

@Suite struct PCPCodecTests {
    @Test func mapRequestIsSixtyBytesWithV4MappedClientAndNonce() {
        let bytes = PCP.MapRequest(nonce: nonce, client: clientIP, internalPort: 4000, lifetime: 7200).bytes
        #expect(bytes.count == 60)
        #expect(Array(bytes[0..<4]) == [2, 1, 0, 0])
        #expect(Array(bytes[4..<8]) == be(UInt32(7200)))
        #expect(Array(bytes[8..<24]) == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 1, 2])
        #expect(Array(bytes[24..<36]) == nonce)
        #expect(bytes[36] == 17)
        #expect(Array(bytes[40..<42]) == be(UInt16(4000)))
        #expect(Array(bytes[42..<44]) == [0, 0])
        #expect(Array(bytes[44..<60]) == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0])
    }

    @Test func mapResponseDecodes() throws {
        let response = try PCP.decodeResponse(pcpMapResponse(nonce: nonce))
        #expect(response.opcode == .map)
        #expect(response.result == .success)
        #expect(response.lifetime == 3600)
        #expect(response.epoch == 100)
        #expect(response.map?.externalIP == .v4(203, 0, 113, 10))
        #expect(response.map?.externalPort == 40000)
        #expect(response.map?.nonce == nonce)
    }

    @Test func announceDecodes() throws {
        let response = try PCP.decodeResponse(pcpAnnounce(epoch: 3))
        #expect(response.opcode == .announce)
        #expect(response.map == nil)
        #expect(response.epoch == 3)
    }

    @Test func shortInputIsRejected() {
        for length in [0, 1, 4, 23, 24 + 4, 59] {
            let bytes = Array(pcpMapResponse(nonce: nonce).prefix(length))
            #expect(throws: PCP.DecodeFailure.length(length)) { try PCP.decodeResponse(bytes) }
        }
        #expect(throws: PCP.DecodeFailure.length(1104)) { try PCP.decodeResponse([UInt8](repeating: 2, count: 1104)) }
        #expect(throws: PCP.DecodeFailure.length(62)) { try PCP.decodeResponse(pcpMapResponse(nonce: nonce) + [0, 0]) }
    }

    @Test func wrongVersionOpcodeOrDirectionIsRejected() {
        #expect(throws: PCP.DecodeFailure.version(0)) { try PCP.decodeResponse(pcpMapResponse(nonce: nonce, version: 0)) }
        #expect(throws: PCP.DecodeFailure.version(1)) { try PCP.decodeResponse(pcpMapResponse(nonce: nonce, version: 1)) }
        #expect(throws: PCP.DecodeFailure.opcode(2)) { try PCP.decodeResponse(pcpMapResponse(nonce: nonce, opcode: 0x82)) }
        #expect(throws: PCP.DecodeFailure.notResponse) { try PCP.decodeResponse(pcpMapResponse(nonce: nonce, opcode: 0x01)) }
    }

    @Test func resultCodesHaveTheRFCNames() {
        #expect(PCP.ResultCode.success.description == "SUCCESS")
        #expect(PCP.ResultCode.addressMismatch.description == "ADDRESS_MISMATCH")
        #expect(PCP.ResultCode.excessiveRemotePeers.description == "EXCESSIVE_REMOTE_PEERS")
        #expect(PCP.ResultCode(rawValue: 200).description == "RESULT_200")
    }

    @Test func v4MappedAddressesRoundTripAndV6StaysV6() {
        #expect(PCP.decode(PCP.encode(.v4(1, 2, 3, 4))) == .v4(1, 2, 3, 4))
        let v6: [UInt8] = [0x20, 0x01, 0x0d, 0xb8] + [UInt8](repeating: 0, count: 11) + [1]
        #expect(PCP.decode(PCP.encode(.v6(v6))) == .v6(v6))
    }
}

@Suite struct PCPMapClientTests {
    let t0 = ContinuousClock.now

    @Test func mapsOnAMatchingResponseAndSchedulesTheRefreshAtHalfLifetime() throws {
        var client = machine()
        guard case let .send(bytes, wakeAt) = client.start(now: t0) else { Issue.record("no send"); return }
        #expect(bytes.count == 60)
        #expect(wakeAt == t0 + .seconds(3))
        let action = client.received(pcpMapResponse(nonce: nonce), from: gatewayPCP, now: t0 + .milliseconds(5))
        guard case let .mapped(mapping, restarted, refresh) = action else { Issue.record("not mapped: \(action)"); return }
        #expect(!restarted)
        #expect(mapping.external == SocketAddress(ip: .v4(203, 0, 113, 10), port: 40000))
        #expect(mapping.lifetimeSeconds == 3600)
        #expect(refresh == t0 + .milliseconds(5) + .seconds(1800))
    }

    @Test func retransmitsWithDoublingBackOffUntilTheBound() {
        var client = machine()
        _ = client.start(now: t0)
        var sends: [Duration] = []
        var now = t0
        while true {
            now = now + .seconds(1)
            let action = client.timerFired(now: now)
            if case .send = action { sends.append(now - t0) }
            if case let .failed(error) = action {
                #expect(error.code == .timeout)
                #expect(now - t0 >= .seconds(10))
                break
            }
            #expect(now - t0 <= .seconds(11))
        }
        // IRT 3 s, then 6 s later (RT doubles): at 3 s and 9 s, and the 10 s bound ends it.
        #expect(sends == [.seconds(3), .seconds(9)])
    }

    @Test func ignoresAWrongNonceAndWaitsForTheRealAnswer() {
        var client = machine()
        _ = client.start(now: t0)
        let forged = pcpMapResponse(nonce: Array(repeating: 9, count: 12), externalPort: 666)
        guard case .ignored = client.received(forged, from: gatewayPCP, now: t0) else { Issue.record("forged accepted"); return }
        #expect(client.mapping == nil)
        guard case .mapped = client.received(pcpMapResponse(nonce: nonce), from: gatewayPCP, now: t0) else {
            Issue.record("real answer refused"); return
        }
        #expect(client.ignoredCount == 1)
    }

    @Test func ignoresResponsesFromAnotherHostPortProtocolOrInternalPort() {
        var client = machine()
        _ = client.start(now: t0)
        let other = SocketAddress(ip: .v4(10, 0, 1, 99), port: 5351)
        #expect(isIgnored(client.received(pcpMapResponse(nonce: nonce), from: other, now: t0)))
        #expect(isIgnored(client.received(pcpMapResponse(nonce: nonce), from: SocketAddress(ip: gatewayIP, port: 9), now: t0)))
        #expect(isIgnored(client.received(pcpMapResponse(nonce: nonce, protocolNumber: 6), from: gatewayPCP, now: t0)))
        #expect(isIgnored(client.received(pcpMapResponse(nonce: nonce, internalPort: 22), from: gatewayPCP, now: t0)))
        #expect(client.ignoredCount == 4)
        #expect(client.mapping == nil)
    }

    @Test func unsolicitedAnnounceFromANonGatewayIsIgnored() {
        var client = machine()
        _ = client.start(now: t0)
        _ = client.received(pcpMapResponse(nonce: nonce), from: gatewayPCP, now: t0)
        let stranger = SocketAddress(ip: .v4(10, 0, 1, 66), port: 5351)
        #expect(isIgnored(client.received(pcpAnnounce(), from: stranger, now: t0 + .seconds(1))))
        #expect(client.restartCount == 0)
        #expect(client.mapping != nil)
    }

    @Test func announceFromTheGatewayRemaps() {
        var client = machine()
        _ = client.start(now: t0)
        _ = client.received(pcpMapResponse(nonce: nonce), from: gatewayPCP, now: t0)
        let announce = client.received(pcpAnnounce(), from: SocketAddress(ip: gatewayIP, port: 5351), now: t0 + .seconds(60))
        guard case let .send(bytes, _) = announce else { Issue.record("no re-map: \(announce)"); return }
        #expect(Array(bytes[24..<36]) == nonce)
        let answer = client.received(pcpMapResponse(nonce: nonce, epoch: 1, externalPort: 40001), from: gatewayPCP,
                                     now: t0 + .seconds(60))
        guard case let .mapped(mapping, restarted, _) = answer else { Issue.record("not re-mapped: \(answer)"); return }
        #expect(restarted)
        #expect(mapping.external.port == 40001)
        #expect(client.restartCount == 1)
    }

    /// Maps with epoch 5000, refreshes 1800 s later and answers the refresh with `epoch`; whether the machine saw a
    /// restart (nil: the refresh was not taken), and its restart count.
    private func refresh(answeringWithEpoch epoch: UInt32) -> (restarted: Bool?, count: Int) {
        var client = machine()
        _ = client.start(now: t0)
        _ = client.received(pcpMapResponse(nonce: nonce, epoch: 5000), from: gatewayPCP, now: t0)
        let refreshTime = t0 + .seconds(1800)
        guard case .send = client.timerFired(now: refreshTime) else { return (nil, client.restartCount) }
        let answer = client.received(pcpMapResponse(nonce: nonce, epoch: epoch), from: gatewayPCP, now: refreshTime)
        guard case let .mapped(_, restarted, _) = answer else { return (nil, client.restartCount) }
        return (restarted, client.restartCount)
    }

    @Test func anEpochThatWentBackOnRefreshCountsAsARestart() {
        let outcome = refresh(answeringWithEpoch: 3)
        #expect(outcome.restarted == true)
        #expect(outcome.count == 1)
    }

    @Test func aSteadyEpochOnRefreshIsNoRestart() {
        // 1800 s later the server's epoch advanced by 1800 s too.
        let outcome = refresh(answeringWithEpoch: 6800)
        #expect(outcome.restarted == false)
        #expect(outcome.count == 0)
    }

    /// The epoch is the router's number: one just below the last (tolerated as reordering by the first check) or
    /// 2^32−1 must not trap the §8.5 arithmetic. Both disagree with our clock after 1800 s, so both are restarts.
    @Test(arguments: [UInt32(4999), .max])
    func extremeEpochsOnRefreshAreRestartsNotTraps(epoch: UInt32) {
        let outcome = refresh(answeringWithEpoch: epoch)
        #expect(outcome.restarted == true)
        #expect(outcome.count == 1)
    }

    @Test func lyingSuccessesAreTypedErrors() {
        let lies: [(String, [UInt8])] = [
            ("lifetime 0", pcpMapResponse(nonce: nonce, lifetime: 0)),
            ("external port 0", pcpMapResponse(nonce: nonce, externalPort: 0)),
            ("IPv6 for an IPv4 client", pcpMapResponse(nonce: nonce, external: [0x20, 1, 0xd, 0xb8] + [UInt8](repeating: 0, count: 12))),
        ]
        for (name, bytes) in lies {
            var client = machine()
            _ = client.start(now: t0)
            let action = client.received(bytes, from: gatewayPCP, now: t0)
            guard case let .failed(error) = action else { Issue.record("\(name) accepted: \(action)"); continue }
            #expect(error.code == .malformed, "\(name)")
            #expect(client.mapping == nil, "\(name)")
        }
    }

    @Test func theLongestLifetimeIsClampedSoRefreshesStillHappen() {
        var client = machine()
        _ = client.start(now: t0)
        let action = client.received(pcpMapResponse(nonce: nonce, lifetime: .max), from: gatewayPCP, now: t0)
        guard case let .mapped(mapping, _, refresh) = action else { Issue.record("not mapped: \(action)"); return }
        #expect(mapping.lifetimeSeconds == 86_400)
        #expect(refresh == t0 + .seconds(43_200))
    }

    @Test func errorResultsAndANATPMPOnlyRouterFailWithTheirCodes() {
        var refused = machine()
        _ = refused.start(now: t0)
        guard case let .failed(error) = refused.received(pcpMapResponse(nonce: nonce, result: 2), from: gatewayPCP, now: t0)
        else { Issue.record("NOT_AUTHORIZED accepted"); return }
        #expect(error.code == .refused)
        #expect(error.message.contains("NOT_AUTHORIZED"))

        var natpmpOnly = machine()
        _ = natpmpOnly.start(now: t0)
        // RFC 6886 answer to an unknown version: version 0, opcode 128 + op, result 1 (unsupported version).
        let natpmpAnswer: [UInt8] = [0, 0x81, 0, 1, 0, 0, 0, 5] + [UInt8](repeating: 0, count: 8)
        guard case let .failed(unsupported) = natpmpOnly.received(natpmpAnswer, from: gatewayPCP, now: t0)
        else { Issue.record("NAT-PMP answer not recognised"); return }
        #expect(unsupported.code == .unsupported)
    }

    @Test func deleteSendsLifetimeZeroAndEndsOnTheAnswerOrTheBound() {
        var client = machine()
        _ = client.start(now: t0)
        _ = client.received(pcpMapResponse(nonce: nonce), from: gatewayPCP, now: t0)
        guard case let .send(bytes, _) = client.delete(now: t0 + .seconds(1)) else { Issue.record("no delete sent"); return }
        #expect(Array(bytes[4..<8]) == [0, 0, 0, 0])
        guard case .deleted = client.received(pcpMapResponse(nonce: nonce, lifetime: 0), from: gatewayPCP, now: t0 + .seconds(1))
        else { Issue.record("delete answer not taken"); return }
        #expect(client.isFinished)

        var silent = machine()
        _ = silent.start(now: t0)
        _ = silent.received(pcpMapResponse(nonce: nonce), from: gatewayPCP, now: t0)
        _ = silent.delete(now: t0)
        guard case .deleted = silent.timerFired(now: t0 + .seconds(2)) else { Issue.record("delete not bounded"); return }
    }

    @Test func aRefreshThatIsNeverAnsweredLosesTheMappingAtTheLeaseEnd() {
        var client = machine()
        _ = client.start(now: t0)
        _ = client.received(pcpMapResponse(nonce: nonce, lifetime: 60), from: gatewayPCP, now: t0)
        guard case .send = client.timerFired(now: t0 + .seconds(30)) else { Issue.record("no refresh"); return }
        #expect(client.mapping != nil)
        guard case let .failed(error) = client.timerFired(now: t0 + .seconds(60)) else { Issue.record("lease outlived"); return }
        #expect(error.code == .timeout)
    }

    private func isIgnored(_ action: PCPMapClient.Action) -> Bool {
        if case .ignored = action { return true }
        return false
    }
}
