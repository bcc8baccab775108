// HolePunchStrategy module.
