"""Helpers the benchmarks share (not benchmarks themselves: they print no RESULT lines)."""
