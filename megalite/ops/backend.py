"""Which implementation runs a kernel: CUDA (``megalite._cuda``), C++ CPU (``megalite._C``) or the
pure-PyTorch reference.

Both extensions register their kernels as PyTorch custom operators (``torch.ops.megalite.*``, see
``csrc/cpu/bindings.cpp`` and ``csrc/cuda/bindings.cpp``), so once one is imported the dispatcher
picks the CPU or CUDA implementation from the tensors' device.  This module only decides whether
the native operator exists for a device, or whether the reference must run instead:

    MEGALITE_KERNELS=reference   always the reference (debugging, comparison); read at every call
    MEGALITE_KERNELS unset/auto  native where built, else the reference, with ONE warning saying so
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Dict, Optional

import torch

ENV_VAR = "MEGALITE_KERNELS"
_CHOICES = ("auto", "reference")

_extension_for_device = {"cpu": "megalite._C", "cuda": "megalite._cuda"}
_loaded: Dict[str, bool] = {}          # extension module name -> imported successfully
_load_errors: Dict[str, str] = {}
_warned: set = set()


def forced_reference() -> bool:
    """True when ``MEGALITE_KERNELS=reference`` asks for the pure-PyTorch kernels."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={choice!r} is not one of {_CHOICES}; unset it or use 'reference'")
    return choice == "reference"


def _load(module_name: str) -> bool:
    if module_name not in _loaded:
        try:
            if module_name == "megalite._cuda":
                _load("megalite._C")  # the CPU library defines the operator schemas the CUDA one implements
            importlib.import_module(module_name)
            _loaded[module_name] = True
        except ImportError as error:
            _loaded[module_name] = False
            _load_errors[module_name] = str(error)
    return _loaded[module_name]


def native_available(device: torch.device) -> bool:
    """Whether the compiled kernels for ``device`` are importable (ignores MEGALITE_KERNELS)."""
    module_name = _extension_for_device.get(torch.device(device).type)
    return module_name is not None and _load(module_name)


def use_native(device: torch.device) -> bool:
    """Whether kernels on ``device`` should run the compiled operators (False -> reference).

    Under torch.compile (``--compile``) the reference runs: the compiler fuses it with its
    neighbours, and the native operators have no fake-tensor implementation to be traced with.
    (Asked first: the compiler of torch 2.4 cannot trace the environment read of ``forced_reference``,
    and broke each layer's graph there.)
    """
    if torch.compiler.is_compiling() or forced_reference():
        return False
    device = torch.device(device)
    if native_available(device):
        return True
    module_name = _extension_for_device.get(device.type)
    if module_name is not None and module_name not in _warned:
        _warned.add(module_name)
        warnings.warn(f"{module_name} is not available ({_load_errors.get(module_name, 'not built')}); "
                      f"megalite uses its pure-PyTorch reference kernels on {device.type}, which are correct "
                      f"but slower. Build the extension with `python setup.py build_ext --inplace`.",
                      RuntimeWarning, stacklevel=3)
    return False


def backend_name(device: torch.device) -> str:
    """'cuda', 'cpu' or 'reference': what a kernel call on ``device`` would run now."""
    return torch.device(device).type if use_native(device) else "reference"


def check_tensor(name: str, tensor: Optional[torch.Tensor], device: torch.device, dtypes=None) -> None:
    """Refuse an input the kernels cannot take, naming it and the fix."""
    if tensor is None:
        return
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the other inputs are on {device}; "
                         f"move it with .to({str(device)!r})")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} (shape {tuple(tensor.shape)}, strides {tensor.stride()}) is not contiguous; "
                         f"pass {name}.contiguous()")
    if dtypes is not None and tensor.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected one of {[str(d) for d in dtypes]}")
