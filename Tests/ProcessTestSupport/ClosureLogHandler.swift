public import Logging

/// A log handler that hands every record (level, message, metadata) to a closure, for tests that assert what was
/// logged and how often; it keeps nothing itself.
public struct ClosureLogHandler: LogHandler {
    /// Called for every record, at every level.
    public let onLog: @Sendable (Logger.Level, String, Logger.Metadata) -> Void
    /// The logger's metadata.
    public var metadata: Logger.Metadata = [:]
    /// The level below which records are dropped (trace: none are).
    public var logLevel: Logger.Level = .trace

    /// Creates a handler calling `onLog`.
    public init(onLog: @escaping @Sendable (Logger.Level, String, Logger.Metadata) -> Void) {
        self.onLog = onLog
    }

    /// One metadata value.
    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    /// Hands the record to ``onLog``.
    public func log(event: LogEvent) { onLog(event.level, event.message.description, event.metadata ?? [:]) }
}
