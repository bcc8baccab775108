/// Why a port mapping could not be made, kept or deleted.
///
/// A router is a stranger on the LAN as far as this module is concerned: every failure it can cause (no answer, a
/// refusal, a malformed or lying answer) ends in one of these codes, never in a crash or an unbounded wait.
public struct PortMappingError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What kind of failure; extensible static members, like the project's other public error codes.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The name used in messages.
        public var name: String

        /// Creates a code; the module's codes are the static members.
        public init(name: String) { self.name = name }

        /// No router answered within the bound.
        public static let timeout = Code(name: "timeout")
        /// The router answered but refused the mapping (a PCP or NAT-PMP result code, a UPnP SOAP error).
        public static let refused = Code(name: "refused")
        /// The router does not speak the protocol (PCP UNSUPP_VERSION, no IGD found).
        public static let unsupported = Code(name: "unsupported")
        /// An answer broke the protocol (wrong length, family, port 0, an impossible lifetime).
        public static let malformed = Code(name: "malformed")
        /// The local side failed: no gateway known, a socket could not be opened, bad arguments.
        public static let local = Code(name: "local")
        /// The caller cancelled the work, or the mapper was shut down.
        public static let cancelled = Code(name: "cancelled")

        /// The code's name.
        public var description: String { name }
    }

    /// What kind of failure.
    public var code: Code
    /// What happened, for people.
    public var message: String
    /// The protocol that failed, when one did.
    public var mappingProtocol: PortMappingProtocol?

    /// Creates an error.
    public init(_ code: Code, _ message: String, protocol mappingProtocol: PortMappingProtocol? = nil) {
        self.code = code
        self.message = message
        self.mappingProtocol = mappingProtocol
    }

    /// `protocol code: message`, e.g. `pcp refused: NOT_AUTHORIZED`.
    public var description: String {
        "\(mappingProtocol.map { "\($0) " } ?? "")\(code): \(message)"
    }
}
