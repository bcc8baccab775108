public import Logging

/// The recommended strategy, `strategies/default.lua`, compiled into the library so that every user of the
/// package gets it without a file path: `PunchExecutor.Configuration()`, the CLI and the examples use it
/// when no strategy is named. ``DefaultStrategy`` (the Swift plan) stays the fallback of last resort.
extension LuaStrategy {
    /// The chunk name the bundled script reports in errors (`default.lua:LINE: …`).
    public static let bundledDefaultChunkName = "default.lua"

    /// The text of `strategies/default.lua` as it was when the library was built.
    public static var bundledDefaultSource: String {
        // The resource is a symlink to strategies/default.lua, embedded by SwiftPM (see docs/design-notes.md).
        String(decoding: PackageResources.default_lua, as: UTF8.self)
    }

    /// A fresh Lua state running the bundled `default.lua`. Throws only when the sandbox cannot hold the
    /// script (e.g. `limits.memoryLimit` is too small); the shipped script itself is checked by the tests.
    public static func bundledDefault(limits: Limits = Limits(), logger: Logger? = nil) throws(StrategyError)
        -> LuaStrategy
    {
        try LuaStrategy(source: bundledDefaultSource, chunkName: bundledDefaultChunkName, limits: limits,
                        logger: logger)
    }
}

extension FallbackStrategy {
    /// The recommended strategy: the bundled `default.lua` (``LuaStrategy/bundledDefault(limits:logger:)``),
    /// with ``DefaultStrategy`` answering whenever the script fails. This is what
    /// `PunchExecutor.Configuration()` uses when no strategy is given.
    ///
    /// The Lua state is made when the strategy is first used, not here: a configuration is often made and never
    /// plans with its default (one executor per socket, each given its own strategy), and making a state costs
    /// about a million instructions.
    public static func recommended(limits: LuaStrategy.Limits = .init(), logger: Logger? = nil,
                                   onFallback: (@Sendable (StrategyError) -> Void)? = nil) -> FallbackStrategy {
        deferred(logger: logger, onFallback: onFallback) { () throws(StrategyError) in
            try LuaStrategy.bundledDefault(limits: limits, logger: logger)
        }
    }
}
