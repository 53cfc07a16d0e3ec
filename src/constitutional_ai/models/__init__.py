"""Small local models: the offline demo model and the tiny models tests and benchmarks build."""
