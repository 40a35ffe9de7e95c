"""The runtime: a call checked, its content values computed, its backend bound (generated kernels or the CPU path) and run."""
