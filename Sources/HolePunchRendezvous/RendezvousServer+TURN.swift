extension RendezvousServer {
    /// `action` with TURN credentials added when it confirms a registration and the server mints them.
    ///
    /// Done here rather than in `RendezvousState`: minting reads the wall clock (coturn compares the username's expiry
    /// with Unix time), and the state machine runs on a monotonic clock of its own.
    func grantingTURN(_ action: RendezvousState.Action) -> RendezvousState.Action {
        guard let minting = configuration.turn, case .send(.registered(var registered), let node, let after) = action else {
            return action
        }
        registered.turn = minting.grant(for: node)
        return .send(.registered(registered), to: node, after: after)
    }
}
