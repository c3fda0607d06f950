"""megalite's kernels: fused LayerNorm / RMSNorm and SwiGLU (here), fused Adam (``megalite.optim.adam``).

Each call picks the CUDA kernel, the C++ CPU kernel or the pure-PyTorch reference
(``megalite.ops.reference``), see ``megalite.ops.backend``; ``MEGALITE_KERNELS=reference`` forces
the reference.
"""
from megalite.ops.backend import backend_name
from megalite.ops.norms import layer_norm, rms_norm
from megalite.ops.swiglu import swiglu

__all__ = ["backend_name", "layer_norm", "rms_norm", "swiglu"]
