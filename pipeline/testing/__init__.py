"""Known-answer simulators and store comparisons used by the tests and the benchmarks (not by
the stages)."""
