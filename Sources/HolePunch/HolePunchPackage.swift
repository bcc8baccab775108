// Not named `HolePunchVersion`: the symbol-graph extractor leaves out any `<Module>Version` symbol (it takes it
// for the version constant an Apple framework build generates), so DocC would not know the type.

/// Facts about the HolePunch package itself.
public enum HolePunchPackage {
    /// The package version as `MAJOR.MINOR.PATCH` (semantic versioning).
    ///
    /// This is the one place the version is written: `holepunch --version` prints it, and a release bumps it here.
    public static let version = "0.1.0"
}
