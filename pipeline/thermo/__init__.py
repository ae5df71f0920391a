"""Stage thermo: temperatures, entropies, first law, efficiencies and sweep fits derived from
the measured store (no checkpoint I/O)."""
