"""The benchmarks, each run as a module from the repository root (python3 -m bench.throughput, bench.real_shape,
bench.gpu, bench.quality, bench.rehearsal, bench.trl_peer); bench.workload holds what several of them time."""
