// HolePunchSTUN module.
