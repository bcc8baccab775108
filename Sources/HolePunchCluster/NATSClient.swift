internal import CNats
internal import Foundation
internal import HolePunchRendezvous

/// One message as it arrived from NATS, copied out of the C library's buffer (which is freed at once).
struct NATSMessage: Sendable {
    var subject: String
    var reply: String?
    var data: [UInt8]
}

/// What a connection reports: messages on any of its subscriptions, and reconnects.
///
/// The C library calls back on its own threads; these closures must be thread-safe and return quickly.
struct NATSEvents: Sendable {
    var message: @Sendable (NATSMessage) -> Void
    var reconnected: @Sendable () -> Void
    var disconnected: @Sendable () -> Void
}

/// The C callbacks' context: the Swift closures, reached from the `void *closure` argument.
///
/// Retained once for the connection's callbacks, released by the closed callback (the last of them), and once
/// per subscription, released by that subscription's completion callback: the library may run a subscription's
/// message handler once more after the subscription or the connection is closed (nats.h,
/// `natsSubscription_SetOnCompleteCB`), so no release may depend on the closed callback alone.
private final class NATSCallbackBox: Sendable {
    let events: NATSEvents
    let maximumPayload: Int
    init(events: NATSEvents, maximumPayload: Int) {
        self.events = events
        self.maximumPayload = maximumPayload
    }
}

/// `natsMsgHandler`: copies the message out, frees it, forwards it. A payload over the bound is not copied: it
/// is delivered as one zero byte, which every decoder refuses (an empty payload means "no responders").
private let natsMessageThunk: natsMsgHandler = { _, _, msg, closure in
    defer { natsMsg_Destroy(msg) }
    guard let msg, let closure else { return }
    let box = Unmanaged<NATSCallbackBox>.fromOpaque(closure).takeUnretainedValue()
    let subject = natsMsg_GetSubject(msg).map { String(cString: $0) } ?? ""
    let reply = natsMsg_GetReply(msg).map { String(cString: $0) }
    let length = Int(natsMsg_GetDataLength(msg))
    var data: [UInt8] = []
    if length > 0, length <= box.maximumPayload, let bytes = natsMsg_GetData(msg) {
        data = bytes.withMemoryRebound(to: UInt8.self, capacity: length) { Array(UnsafeBufferPointer(start: $0, count: length)) }
    } else if length > box.maximumPayload {
        data = [0]
    }
    box.events.message(NATSMessage(subject: subject, reply: reply, data: data))
}

private let natsReconnectedThunk: natsConnectionHandler = { _, closure in
    guard let closure else { return }
    Unmanaged<NATSCallbackBox>.fromOpaque(closure).takeUnretainedValue().events.reconnected()
}

private let natsDisconnectedThunk: natsConnectionHandler = { _, closure in
    guard let closure else { return }
    Unmanaged<NATSCallbackBox>.fromOpaque(closure).takeUnretainedValue().events.disconnected()
}

/// `natsOnCompleteCB`: the subscription is closed and its message handler has returned for the last time:
/// balances the retain taken when it subscribed.
private let natsSubscriptionCompleteThunk: natsOnCompleteCB = { closure in
    guard let closure else { return }
    Unmanaged<NATSCallbackBox>.fromOpaque(closure).release()
}

/// The last callback the library makes for a connection: balances the retain taken at connect.
private let natsClosedThunk: natsConnectionHandler = { _, closure in
    guard let closure else { return }
    Unmanaged<NATSCallbackBox>.fromOpaque(closure).release()
}

/// Turns a NATS status into a typed error where it first appears.
func natsCheck(_ status: natsStatus, _ what: String) throws(RendezvousError) {
    guard status != NATS_OK else { return }
    let text = natsStatus_GetText(status).map { String(cString: $0) } ?? "status \(status.rawValue)"
    throw RendezvousError(.connectionFailed, "\(what): \(text)")
}

/// Owns a `natsOptions` (destroyed in deinit; the connection keeps its own copy).
final class NATSOptions {
    let pointer: OpaquePointer

    init() throws(RendezvousError) {
        var created: OpaquePointer?
        try natsCheck(natsOptions_Create(&created), "cannot create NATS options")
        guard let created else { throw RendezvousError(.connectionFailed, "cannot create NATS options") }
        pointer = created
    }

    deinit { natsOptions_Destroy(pointer) }
}

/// Owns a `natsConnection`: closed and destroyed in deinit. The C library's connection is thread-safe (every
/// call locks it), so sharing this wrapper across tasks is safe, hence `@unchecked Sendable`.
final class NATSConnection: @unchecked Sendable {
    let pointer: OpaquePointer

    /// Connects to `url` (one attempt, bounded by `timeout`); afterwards the library reconnects by itself, forever,
    /// every `reconnectWait`, and re-subscribes what was subscribed.
    init(url: String, name: String, timeout: Duration, reconnectWait: Duration, pingInterval: Duration,
         maximumPayload: Int, events: NATSEvents) throws(RendezvousError) {
        let options = try NATSOptions()
        let box = Unmanaged.passRetained(NATSCallbackBox(events: events, maximumPayload: maximumPayload))
        let closure = box.toOpaque()
        func milliseconds(_ d: Duration) -> Int64 { max(1, Int64(d / .milliseconds(1))) }
        do throws(RendezvousError) {
            try natsCheck(natsOptions_SetURL(options.pointer, url), "invalid NATS URL \(redactedNATSURL(url))")
            try natsCheck(natsOptions_SetName(options.pointer, name), "cannot name the NATS connection")
            try natsCheck(natsOptions_SetTimeout(options.pointer, milliseconds(timeout)), "cannot set the NATS timeout")
            try natsCheck(natsOptions_SetAllowReconnect(options.pointer, true), "cannot allow NATS reconnects")
            try natsCheck(natsOptions_SetMaxReconnect(options.pointer, -1), "cannot set NATS reconnects")
            try natsCheck(natsOptions_SetReconnectWait(options.pointer, milliseconds(reconnectWait)), "cannot set the reconnect wait")
            try natsCheck(natsOptions_SetPingInterval(options.pointer, milliseconds(pingInterval)), "cannot set the ping interval")
            try natsCheck(natsOptions_SetMaxPingsOut(options.pointer, 2), "cannot set the pings out")
            // By default every asynchronous subscription gets its own delivery thread, and the directory holds one
            // subscription per registered NodeID: the library's shared delivery pool keeps that to a few threads.
            try natsCheck(natsOptions_UseGlobalMessageDelivery(options.pointer, true), "cannot share NATS delivery threads")
            try natsCheck(natsOptions_SetReconnectedCB(options.pointer, natsReconnectedThunk, closure), "cannot set a callback")
            try natsCheck(natsOptions_SetDisconnectedCB(options.pointer, natsDisconnectedThunk, closure), "cannot set a callback")
            try natsCheck(natsOptions_SetClosedCB(options.pointer, natsClosedThunk, closure), "cannot set a callback")
            var connection: OpaquePointer?
            try natsCheck(natsConnection_Connect(&connection, options.pointer), "cannot connect to NATS at \(redactedNATSURL(url))")
            guard let connection else { throw RendezvousError(.connectionFailed, "cannot connect to NATS at \(redactedNATSURL(url))") }
            pointer = connection
        } catch {
            // No connection was made, so the closed callback will never run: balance the retain here.
            box.release()
            throw error
        }
        self.box = box
    }

    private let box: Unmanaged<NATSCallbackBox>

    /// Subscribes `subject` (messages go to the connection's ``NATSEvents``); at most `pendingMessages` wait for
    /// delivery, beyond which the library drops them (a slow consumer), so a flood cannot grow memory.
    /// Whether the connection is up now (not connecting, reconnecting or closed).
    var isConnected: Bool { natsConnection_Status(pointer) == NATS_CONN_STATUS_CONNECTED }

    func subscribe(_ subject: String, pendingMessages: Int) throws(RendezvousError) -> NATSSubscription {
        // The subscription's own retain on the box, released by its completion callback (see NATSCallbackBox).
        let retained = box.retain()
        var subscription: OpaquePointer?
        let status = natsConnection_Subscribe(&subscription, pointer, subject, natsMessageThunk, retained.toOpaque())
        guard status == NATS_OK, let subscription else {
            // Not subscribed, so no message was or will be delivered with this retain.
            retained.release()
            try natsCheck(status, "cannot subscribe to \(subject)")
            throw RendezvousError(.connectionFailed, "cannot subscribe to \(subject)")
        }
        // Fails only if the subscription was closed already (the connection closing meanwhile): whether its handler
        // is still running is then unknown, so the retain is kept: one small box leaked rather than freed too early.
        _ = natsSubscription_SetOnCompleteCB(subscription, natsSubscriptionCompleteThunk, retained.toOpaque())
        _ = natsSubscription_SetPendingLimits(subscription, Int32(clamping: pendingMessages), Int32(clamping: pendingMessages * 1024))
        return NATSSubscription(pointer: subscription, connection: self)
    }

    /// Publishes `data` on `subject` (buffered; while reconnecting, into the library's reconnect buffer).
    func publish(_ subject: String, _ data: [UInt8], reply: String? = nil) throws(RendezvousError) {
        let status = data.withUnsafeBytes { raw in
            if let reply {
                natsConnection_PublishRequest(pointer, subject, reply, raw.baseAddress, Int32(raw.count))
            } else {
                natsConnection_Publish(pointer, subject, raw.baseAddress, Int32(raw.count))
            }
        }
        try natsCheck(status, "cannot publish on \(subject)")
    }

    /// Blocks until NATS has processed everything sent so far (a PING/PONG round trip), at most `timeout`.
    func flush(timeout: Duration) throws(RendezvousError) {
        try natsCheck(natsConnection_FlushTimeout(pointer, max(1, Int64(timeout / .milliseconds(1)))), "NATS flush")
    }

    deinit {
        natsConnection_Close(pointer)
        natsConnection_Destroy(pointer)
    }
}

/// Owns a `natsSubscription`: unsubscribed and destroyed in deinit. Holds its connection, so the connection (and
/// the callback box) outlive it. `@unchecked Sendable`: the library locks the subscription on every call.
final class NATSSubscription: @unchecked Sendable {
    private let pointer: OpaquePointer
    private let connection: NATSConnection

    init(pointer: OpaquePointer, connection: NATSConnection) {
        self.pointer = pointer
        self.connection = connection
    }

    deinit {
        _ = natsSubscription_Unsubscribe(pointer)
        natsSubscription_Destroy(pointer)
    }
}

/// `url` with the password (or token) of its user-info part replaced by `***`, for error messages and logs:
/// `nats://user:secret@host:4222` becomes `nats://user:***@host:4222`, `nats://token@host` becomes `nats://***@host`.
func redactedNATSURL(_ url: String) -> String {
    // Each comma-separated server URL may carry its own credentials.
    url.split(separator: ",", omittingEmptySubsequences: false).map { part -> String in
        let text = String(part)
        guard let scheme = text.range(of: "://"), let at = text[scheme.upperBound...].lastIndex(of: "@") else { return text }
        let userInfo = text[scheme.upperBound..<at]
        let redacted = userInfo.firstIndex(of: ":").map { "\(userInfo[..<$0]):***" } ?? "***"
        return String(text[..<scheme.upperBound]) + redacted + String(text[at...])
    }.joined(separator: ",")
}
