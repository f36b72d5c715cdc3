"""spqr_kernels: the packed SpQR weight layout and the Triton kernels that multiply by it.

Importing this package does not import triton; the kernel modules do, lazily, when first called.
"""

from .layout import PackedWeight, pack_bits, unpack_bits

__all__ = ["PackedWeight", "pack_bits", "unpack_bits"]
