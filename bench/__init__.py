"""Benchmarks: round timing, convergence, memory, communication, gradient fidelity."""
