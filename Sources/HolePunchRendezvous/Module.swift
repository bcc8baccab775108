// HolePunchRendezvous module.
