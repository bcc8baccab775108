#if canImport(Glibc)
internal import Glibc
#endif

/// Why a datagram socket or transport operation failed.
///
/// The modules above turn it into their own error at their boundary (`STUNError` `.socket`, `QUICError`
/// `.socket`), so it is `package`: no public API throws it.
package struct DatagramError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What kind of failure; extensible static members, like the project's public error codes.
    package struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The name used in messages.
        package var name: String

        /// A system call that creates or configures a socket or the loop failed (`socket`, `setsockopt`, `epoll_ctl`).
        package static let socket = Code(name: "socket")
        /// The address could not be bound (in use, not local, wrong family).
        package static let bind = Code(name: "bind")
        /// The kernel (or the in-memory network) refused a datagram.
        package static let send = Code(name: "send")
        /// Receiving failed with something other than "nothing waiting".
        package static let receive = Code(name: "receive")
        /// The socket or transport is already closed.
        package static let closed = Code(name: "closed")

        /// The code's name.
        package var description: String { name }
    }

    /// What kind of failure.
    package var code: Code
    /// What happened, for people.
    package var message: String
    /// The `errno` value, when a system call failed.
    package var errno: Int32?

    /// Creates an error.
    package init(_ code: Code, _ message: String, errno: Int32? = nil) {
        self.code = code
        self.message = message
        self.errno = errno
    }

    /// An error for a failed system call, with `errno` captured and spelled out.
    package init(_ code: Code, call: String, errno value: Int32 = Glibc.errno) {
        self.init(code, "\(call) failed: \(String(cString: strerror(value))) (errno \(value))", errno: value)
    }

    /// `code: message`.
    package var description: String { "\(code): \(message)" }
}
