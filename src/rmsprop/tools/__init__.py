"""The programs around the optimizer: the command line, the demo, the benchmarks and the claims study."""
