// HolePunchQUIC module.
