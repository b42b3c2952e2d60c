//! Fixtures for tests, the demo and the benchmarks.
