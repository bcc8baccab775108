internal import Foundation
import HolePunch
public import HolePunchQUIC

/// The cluster side of the server: announcing registrations to the directory, answering punch requests routed
/// from other instances, and routing ours to them.
extension RendezvousServer {
    /// Makes this instance one of a cluster: registrations are announced to `directory`, and punch requests for
    /// NodeIDs held elsewhere are routed through it. Call before ``run()``; without it the server is a single
    /// instance, exactly as before.
    public func use(directory: any RendezvousDirectory) {
        self.directory = directory
        directory.attach(self)
    }

    /// Answers a punch request another instance routed here (``RendezvousDirectory``): the target's coordinate
    /// is queued here, the initiator's is returned for the requesting instance to send.
    public func answerRemotePunch(_ request: RemotePunchRequest) -> RemotePunchReply {
        guard phase == .running else {
            return .refused(ErrorReply(requestID: request.requestID, code: RendezvousError.Code.shuttingDown.name,
                                       message: "the instance holding the target is shutting down"))
        }
        let (actions, reply) = state.acceptRemotePunch(request, now: now)
        apply(actions)
        return reply
    }

    /// Another instance registered `node` at `claimedAt` (wall-clock milliseconds). If this instance's registration
    /// is not newer it is dropped (the peer moved); if it is newer, it is announced again so that the other drops.
    public func moved(_ node: NodeID, claimedAt: Int64) {
        guard let since = announced[node], let directory else { return }
        if since > claimedAt {
            directory.registered(node, since: since)
            return
        }
        stats.movedAway += 1
        logger.info("peer moved to another instance", metadata: ["peer.node": "\(node.short)"])
        apply(state.moved(node))
    }

    /// The NodeIDs this instance announced, with their registration times (a directory re-announces them after
    /// it reconnected).
    public func announcedRegistrations() -> [NodeID: Int64] { announced }

    /// Tells the directory whether `node` is held here now, if that changed.
    func syncDirectory(_ node: NodeID) {
        guard let directory else { return }
        let holds = state.peer(node) != nil
        if holds, announced[node] == nil {
            let since = Int64(Date().timeIntervalSince1970 * 1000)
            announced[node] = since
            directory.registered(node, since: since)
        } else if !holds, announced.removeValue(forKey: node) != nil {
            directory.unregistered(node)
        }
    }

    /// A punch request for a NodeID not held here: the requester's checks run here, the rest at the instance the
    /// directory finds.
    func routePunch(from node: NodeID, requestID: UInt64, target: NodeID, via directory: any RendezvousDirectory) {
        switch state.prepareRemotePunch(from: node, requestID: requestID, target: target, secret: .random(),
                                        directoryRTT: directoryRTT, now: now) {
        case .refused(let actions):
            apply(actions)
        case .forward(let request):
            guard routedInFlight < configuration.maxRoutedRequests else {
                apply([.send(.error(ErrorReply(requestID: requestID, code: RendezvousError.Code.capacity.name,
                                               message: "too many punch requests routed to other instances; retry later")),
                             to: node, after: .zero)])
                return
            }
            routedInFlight += 1
            Task { await self.finishRoute(request, via: directory) }
        }
    }

    private func finishRoute(_ request: RemotePunchRequest, via directory: any RendezvousDirectory) async {
        let sent = clock.now
        let result: Result<RemotePunchReply, RendezvousError>
        do { result = .success(try await directory.requestPunch(request)) } catch { result = .failure(error) }
        routedInFlight -= 1
        let roundTrip = sent.duration(to: clock.now)
        guard phase == .running else { return }
        func refuse(_ code: String, _ message: String) {
            apply([.send(.error(ErrorReply(requestID: request.requestID, code: code, message: message)),
                         to: request.initiator, after: .zero)])
        }
        switch result {
        case .failure(let error) where error.code == .unknownTarget:
            refuse(error.code.name, "no peer \(request.target) is registered at any rendezvous instance")
        case .failure(let error):
            refuse(error.code.name, error.message)
        case .success(.refused(let reply)):
            refuse(reply.code, reply.message)
        case let .success(.coordinate(coordinate, delay)):
            guard coordinate.requestID == request.requestID, coordinate.sessionID == request.sessionID,
                  coordinate.sessionKey == request.sessionKey, coordinate.peer == request.target,
                  coordinate.role == .initiator else {
                refuse(RendezvousError.Code.protocolViolation.name, "the instance holding the target answered another request")
                return
            }
            directoryRTT = roundTrip
            stats.recentDirectoryRoundTrips.append(roundTrip)
            if stats.recentDirectoryRoundTrips.count > 64 { stats.recentDirectoryRoundTrips.removeFirst() }
            stats.routedCoordinations += 1
            stats.directoryRoundTripTotal += roundTrip
            // The holder planned for the round trip we sent; the part of this one beyond it is already spent.
            let planned = Duration.microseconds(delay) + (Duration.microseconds(request.directoryRTTMicroseconds) - roundTrip) / 2
            enqueue(.coordinate(coordinate), to: request.initiator, after: max(.zero, planned))
        }
    }
}
