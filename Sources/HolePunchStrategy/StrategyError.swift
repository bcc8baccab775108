/// A strategy failure, typed at the boundary: what went wrong, and where in the script.
///
/// `description` is the one-line `file:line: message` form the CLI prints.
public struct StrategyError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of failure. Extensible: new codes are new static members.
    public struct Code: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
        /// The stable name, e.g. `instructionBudgetExceeded`.
        public var rawValue: String
        /// Wraps a name.
        public init(rawValue: String) { self.rawValue = rawValue }
        /// The raw value.
        public var description: String { rawValue }

        /// The file could not be read.
        public static let fileUnreadable = Code(rawValue: "fileUnreadable")
        /// The chunk did not compile (syntax error, or a binary chunk).
        public static let syntax = Code(rawValue: "syntax")
        /// The chunk did not return a table with a `plan` function.
        public static let missingHook = Code(rawValue: "missingHook")
        /// A Lua runtime error (including calls to functions the sandbox removed).
        public static let runtime = Code(rawValue: "runtime")
        /// The instruction budget of one call ran out, or a single library call (e.g. `string.rep`,
        /// `table.move`, `load`) asked for more work than the sandbox allows; the message says which.
        public static let instructionBudgetExceeded = Code(rawValue: "instructionBudgetExceeded")
        /// The memory cap of the state was reached.
        public static let memoryLimitExceeded = Code(rawValue: "memoryLimitExceeded")
        /// The wall-clock cap of one call ran out, or the call overran it and was abandoned.
        public static let timeLimitExceeded = Code(rawValue: "timeLimitExceeded")
        /// The returned plan had a wrong type, a bad value or an unknown field.
        public static let invalidPlan = Code(rawValue: "invalidPlan")
        /// The Lua state could not be created.
        public static let stateCreationFailed = Code(rawValue: "stateCreationFailed")
        /// A non-Lua strategy threw something that is not a `StrategyError`.
        public static let strategyFailed = Code(rawValue: "strategyFailed")
    }

    /// What kind of failure.
    public var code: Code
    /// What happened, without the position prefix.
    public var message: String
    /// The script's file (or chunk name), when known.
    public var file: String?
    /// The line in `file`, when known.
    public var line: Int?
    /// The plan field at fault, for `invalidPlan` (e.g. `ports[3]`, `timeout_ms`).
    public var field: String?
    /// The underlying error's description, when this wraps one (e.g. a Swift strategy's own error).
    public var cause: String?

    /// Creates an error.
    public init(code: Code, message: String, file: String? = nil, line: Int? = nil, field: String? = nil,
                cause: String? = nil) {
        self.code = code
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        self.cause = cause
    }

    /// `error` itself when it is a `StrategyError`, else a `strategyFailed` error carrying its description
    /// (a Swift strategy may throw anything).
    public static func wrapping(_ error: any Error) -> StrategyError {
        (error as? StrategyError)
            ?? StrategyError(code: .strategyFailed, message: "the strategy threw an error",
                             cause: String(describing: error))
    }

    /// Whether the sandbox stopped the script (instruction budget, time or memory), as opposed to an error
    /// of the script's own making.
    public var isSandboxAbort: Bool {
        code == .instructionBudgetExceeded || code == .timeLimitExceeded || code == .memoryLimitExceeded
    }

    /// `file:line: message`, or as much of it as is known.
    public var description: String {
        switch (file, line) {
        case let (f?, l?): "\(f):\(l): \(message)"
        case let (f?, nil): "\(f): \(message)"
        default: message
        }
    }
}
