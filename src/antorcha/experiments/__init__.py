"""Local clusters of real processes for the demo, tests, benchmarks and experiments."""
