extension Duration {
    /// The duration as a person would write it: three significant digits and a unit (`740 ns`, `12 µs`,
    /// `1.98 ms`, `2.3 s`), trailing zeros dropped. Error messages and logs use it instead of `Duration`'s own
    /// description, which prints `0.001978295 seconds`.
    package var humanDescription: String {
        let (seconds, attoseconds) = components
        let nanoseconds = Double(seconds) * 1e9 + Double(attoseconds) / 1e9
        let magnitude = abs(nanoseconds)
        let sign = nanoseconds < 0 ? "-" : ""
        let units: [(scale: Double, name: String)] = [(1, "ns"), (1e3, "µs"), (1e6, "ms"), (1e9, "s")]
        guard magnitude >= 1 else { return "0 s" }
        // From a million seconds on, whole seconds say it all, and the rounding below could leave Int's range.
        if magnitude >= 1e15 { return sign + "\(seconds.magnitude) s" }
        var index = units.lastIndex { magnitude >= $0.scale } ?? 0
        var digits = Duration.threeSignificant(magnitude / units[index].scale)
        // Rounding can carry into the next unit (999.7 ms is 1 s, not 1000 ms).
        if digits.value >= 1000, index < units.count - 1 {
            index += 1
            digits = Duration.threeSignificant(magnitude / units[index].scale)
        }
        return sign + Duration.decimal(digits.value, places: digits.places) + " " + units[index].name
    }

    /// `value` (at least 1) rounded to three significant digits, as an integer and its number of decimal places.
    private static func threeSignificant(_ value: Double) -> (value: Int, places: Int) {
        let places = value >= 100 ? 0 : value >= 10 ? 1 : 2
        var scaled = value
        for _ in 0..<places { scaled *= 10 }
        let rounded = Int(scaled.rounded())
        // 9.996 rounds to 10.00: keep three significant digits by dropping a place.
        if places > 0, rounded >= 1000 { return (rounded / 10, places - 1) }
        return (rounded, places)
    }

    /// `scaled` with `places` decimal places, without trailing zeros (no Foundation formatter at this layer).
    private static func decimal(_ scaled: Int, places: Int) -> String {
        var divisor = 1
        for _ in 0..<places { divisor *= 10 }
        let whole = scaled / divisor
        var fraction = String(scaled % divisor)
        fraction = String(repeating: "0", count: max(places - fraction.count, 0)) + fraction
        while fraction.hasSuffix("0") { fraction.removeLast() }
        return fraction.isEmpty ? "\(whole)" : "\(whole).\(fraction)"
    }
}
