"""Optional Triton import: the package works (with its PyTorch references) where Triton is absent."""
try:
    import triton
    import triton.language as tl

    triton_available = True
except ImportError:
    triton = None
    tl = None
    triton_available = False
