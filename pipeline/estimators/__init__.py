"""Pure estimators: torch tensors or numpy arrays in, small numbers out; no I/O, no state."""
