// HolePunch module.
