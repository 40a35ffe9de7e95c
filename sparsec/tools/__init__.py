"""Tools over compiled patterns: the command line, benchmarks against peers, the peers themselves."""
