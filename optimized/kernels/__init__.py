"""Triton kernels of the optimized path, one module per kernel family, each public op beside
its eager twin.

Where no accelerator is present the kernels run under Triton's interpreter. TRITON_INTERPRET
must be set before any `@triton.jit` function is defined, so it is decided here, once, by
capability (is there a device Triton can compile for?), never by vendor. Any import order works:
when triton was imported first, its library is rewrapped for the interpreter here
(`_interpret_triton_library`).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch


def _has_triton_device() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def _interpret_triton_library() -> None:
    """Turn triton's own library into interpreter functions when triton was imported before
    the interpreter was switched on (e.g. by `from transformers import ...`, which imports it).

    Triton decides per @jit function, when the function is defined, whether it becomes a
    compiled JITFunction or an InterpretedFunction (triton.runtime.jit.jit reads
    knobs.runtime.interpret, i.e. TRITON_INTERPRET, at decoration time). Our kernels are
    defined after this module has set the variable, so they interpret; but triton.language's
    helpers (tl.zeros, tl.cdiv, tl.sum, the random functions) were defined at triton's import
    and stay JITFunctions, which refuse to be called from an interpreted kernel. Rewrapping
    each one's Python function is what a fresh import under TRITON_INTERPRET=1 would have built.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    import triton.language as tl

    # Library modules and the tensor class (tl.tensor.sum etc. are the same objects as
    # members); a module triton imports lazily later is defined in interpret mode anyway.
    holders = [m for name, m in list(sys.modules.items())
               if m is not None and (name == "triton.language" or name.startswith("triton.language."))]
    holders.append(tl.core.tensor)
    converted: dict[int, InterpretedFunction] = {}
    for holder in holders:
        for name, value in list(vars(holder).items()):
            if isinstance(value, JITFunction):
                if id(value) not in converted:
                    converted[id(value)] = InterpretedFunction(value.fn)
                setattr(holder, name, converted[id(value)])


if not _has_triton_device():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETING and "triton.language" in sys.modules:  # triton came first (any import order works)
    _interpret_triton_library()
if INTERPRETING:
    # The interpreter emulates kernels with numpy, which warns where a kernel's exp or product
    # overflows to inf on purpose (tanh of large arguments, masked scores); compiled code is silent.
    warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning,
                            module="triton.runtime.interpreter")

# Triton's interpreter computes wrong results for arithmetic on bf16 values and for tl.dot on bf16
# operands (shared/DESIGN.md "Kernels"): kernels upcast after every load, and feed tl.dot operands
# in their storage dtype only when compiled (tensor cores), in float32 under the interpreter.
DOT_IN_STORAGE_DTYPE = not INTERPRETING


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu")
    return torch.device("cpu")


def graphs_supported(device: torch.device) -> bool:
    """Whether the device can capture and replay graphs (by capability, not by vendor)."""
    if device.type == "cpu":
        return False
    module = torch.get_device_module(device)
    return hasattr(module, "CUDAGraph") and hasattr(module, "graph")


def device_name(device: torch.device) -> str:
    """The card's name for benchmark records ("NVIDIA H100 80GB HBM3"), or the CPU's."""
    if device.type == "cpu":
        import platform

        return platform.processor() or "cpu"
    return torch.get_device_module(device).get_device_name(device)
