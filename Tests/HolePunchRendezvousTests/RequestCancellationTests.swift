import ProcessTestSupport
import HolePunch
import Testing
@testable import HolePunchRendezvous

@Suite("requestPunch and cancellation", .serialized)
struct RequestCancellationTests {
    @Test("cancelling requestPunch's task ends it as cancelled at once, and the punch really stops")
    func cancelRequest() async throws {
        let harness = try await Harness.start()
        // B refuses every punch, so A's punch would probe unanswered until its 60 s timeout.
        let a = try await harness.client(Identities.a, punchTimeout: .seconds(60))
        let b = try await harness.client(Identities.b, admission: .none)
        _ = try await a.connect()
        _ = try await b.connect()
        let request = Task { try await a.requestPunch(to: Identities.b.nodeID) }
        #expect(await eventually(.seconds(10)) { await a.executor.activePunches().count == 1 })
        request.cancel()
        // Far below the punch's timeout: a cancelled request that ignored the cancellation would outlast this.
        let result = try await withDeadline(.seconds(3)) { await request.result }
        guard case .failure(let failure) = result else { Issue.record("expected a failure, got a connection"); return }
        let error = try #require(failure as? RendezvousError, "\(failure)")
        #expect(error.code == .cancelled, "\(error)")
        #expect(error.punch?.code == .cancelled)
        #expect(await a.executor.activePunches().isEmpty)
        await harness.stop(a, b)
    }

    @Test("a request cancelled before the rendezvous answers ends as cancelled and starts no punch")
    func cancelBeforeCoordinate() async throws {
        let harness = try await Harness.start()
        let a = try await harness.client(Identities.a)
        _ = try await a.connect()
        let request = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return try await a.requestPunch(to: Identities.b.nodeID)
        }
        let result = try await withDeadline(.seconds(3)) { await request.result }
        guard case .failure(let failure) = result else { Issue.record("expected a failure, got a connection"); return }
        #expect((failure as? RendezvousError)?.code == .cancelled, "\(failure)")
        #expect(await a.executor.activePunches().isEmpty)
        await harness.stop(a)
    }
}
