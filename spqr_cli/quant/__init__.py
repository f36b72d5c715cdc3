"""Quantization: the block-by-block driver, Hessians, the shared grid, the methods registry, layer records."""
