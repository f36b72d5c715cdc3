"""Speed benchmarks (needs CUDA): layers vs fp16 and peers, whole models end to end."""
