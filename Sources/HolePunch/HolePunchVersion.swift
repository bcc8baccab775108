/// The version of the HolePunch package.
///
/// This is the one place the version is written: `holepunch --version` prints it, and a release bumps it here.
public enum HolePunchVersion {
    /// The version as `MAJOR.MINOR.PATCH` (semantic versioning).
    public static let string = "0.1.0"
}
