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
def _serialize_interpreted_launches() -> None:
    """One interpreted kernel launch at a time per process, and no redundant re-patching inside it.

    The interpreter is not thread-safe: each launch patches triton.language's functions and sets a
    module-global grid for its duration, so two threads launching at once (two engines' worker
    threads in one test process) failed with "Did you forget to add @triton.jit?" or
    "x >= grid_dim[0]".

    Inside a launch, every call of a @jit helper (ours, and triton's own tl.sum, tl.cumsum, ...)
    patched the language modules visible to it again, though the launch (or an earlier helper call
    in it) had already patched them: `inspect.getmembers` over tl, tl.core, tl.math and tl.tensor,
    a few ms a call. Patching is idempotent (builtins already replaced are skipped; the rest is
    replaced by equivalent wrappers), so a helper whose modules are already patched in this launch
    now runs without it. That was a fifth of an interpreted launch's time (py-spy): on the 2-core
    CPU machine, tests/test_paged_model.py::test_decode_well_past_the_window took 45.8 and 43.6 s
    before, 34.6 and 33.4 s after (alternating runs, one process)."""
    import functools
    import inspect
    import threading

    import triton.language as tl
    from triton.runtime.interpreter import GridExecutor, InterpretedFunction, InterpreterError

    if getattr(GridExecutor.__call__, "serialized", False):
        return
    launch, call, lock = GridExecutor.__call__, InterpretedFunction.__call__, threading.Lock()
    state = threading.local()  # .patched: the language modules patched in this thread's launch
    lang_modules = (tl, tl.core)

    @functools.cache  # per function: called on every helper call, and a module's globals stay put
    def langs(fn) -> frozenset:  # what the interpreter's _patch_lang patches for fn
        return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in lang_modules)

    def serialized(self, *args, **kwargs):
        with lock:
            state.patched = langs(self.fn)
            try:
                return launch(self, *args, **kwargs)
            finally:
                state.patched = None

    def device_call(self, *args, **kwargs):
        patched = getattr(state, "patched", None)
        mine = langs(self.fn)
        if patched is None or not mine <= patched:
            result = call(self, *args, **kwargs)
            if patched is not None:
                state.patched = patched | mine
            return result
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # as the interpreter's own __call__ reports it
            raise InterpreterError(repr(e)) from e

    serialized.serialized = True
    GridExecutor.__call__ = serialized
    InterpretedFunction.__call__ = device_call


if INTERPRETING:
    _serialize_interpreted_launches()
    # The interpreter emulates kernels with numpy, which warns where a kernel's exp or product
    # overflows to inf on purpose (tanh of large arguments, masked scores); compiled code is silent.
    warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning,
                            module="triton.runtime.interpreter")

# Triton's interpreter computes wrong results for arithmetic on bf16 values and for tl.dot on bf16
# operands (shared/DESIGN.md "Kernels"): kernels upcast after every load, and feed tl.dot operands
# in their storage dtype only when compiled (tensor cores), in float32 under the interpreter.
DOT_IN_STORAGE_DTYPE = not INTERPRETING


MIN_HEAD_DIM = 16  # attention's tl.dot tiles span the whole head: a power of two, at least 16


def check_supported(config) -> None:
    """Raise ConfigError naming the field when the optimized path cannot run `config` (a
    Gemma4Config) though the reference can: head sizes that are not a power of two >= 16, more
    experts than the router kernel takes. Call it where a model is chosen, before any work."""
    from reference.config import ConfigError

    from .moe import _MAX_EXPERTS

    for s in config.layers:
        d = s.head_dim
        if d < MIN_HEAD_DIM or d & (d - 1):
            field = "head_dim" if s.is_sliding or d == config.head_dim else "global_head_dim"
            raise ConfigError(f"{field}: {d} (layer {s.index}) is not supported by the optimized path, whose attention "
                              f"kernels need a power of two >= {MIN_HEAD_DIM}; the reference alone can run this model")
    if config.enable_moe_block and config.num_experts > _MAX_EXPERTS:
        raise ConfigError(f"num_experts: {config.num_experts} is more than the optimized path's router kernel "
                          f"takes ({_MAX_EXPERTS})")


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu")
    return torch.device("cpu")


def kernels_run_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of `device` in this process: an accelerator's,
    or the CPU's under the interpreter. Where an accelerator is present Triton compiles for it,
    and a CPU tensor handed to a kernel is refused (common.check_float)."""
    return device.type != "cpu" or INTERPRETING


def kernels_refusal(device: torch.device, what: str, ways: tuple[str, ...] = ()) -> str | None:
    """None where Triton kernels run on `device` here (kernels_run_on); else one line for the
    user, who asked for `what` on it: why not, and what to do instead (`ways`, e.g. the command
    line's "--ops eager", then Triton's interpreter). The CLI and the server say it alike."""
    if kernels_run_on(device):
        return None
    ways = (f"--device {default_device().type}", *ways, "TRITON_INTERPRET=1")
    return (f"{what} {device}, where they run only under Triton's interpreter (this machine's Triton compiles "
            f"for its accelerator): use {', '.join(ways[:-1])} or {ways[-1]}")


def graphs_supported(device: torch.device) -> bool:
    """Whether the device can capture and replay graphs (by capability, not by vendor)."""
    if device.type == "cpu":
        return False
    module = torch.get_device_module(device)
    return hasattr(module, "CUDAGraph") and hasattr(module, "graph")


def capturing(device: torch.device) -> bool:
    """Whether the device's current stream is recording a graph (by capability, not by vendor):
    work enqueued now is recorded, not run, so e.g. a zeroed allocation would stay unzeroed."""
    if device.type == "cpu":
        return False
    check = getattr(torch.get_device_module(device), "is_current_stream_capturing", None)
    return bool(check is not None and check())


def capture_graph(device: torch.device, fn, pool=None):
    """Record fn() into a device graph on a side stream; returns (graph, what fn returned).

    A capture that fails (fn syncs with the host, say) raises RuntimeError and leaves the device
    usable. torch's own `graph` context does not: when ending a broken capture raises, (1) it
    skips restoring the current stream, and (2) the default generator stays in capture mode, so
    every later random op on the thread fails ("Offset increment outside graph capture
    encountered unexpectedly"). On an H200, one engine that fell back to eager decode broke the
    tests after it on its pytest worker. (1) is the `with` below; (2) is an empty capture, whose
    clean end takes the generator out of capture mode."""
    module = torch.get_device_module(device)
    module.synchronize()
    graph = module.CUDAGraph()
    with module.stream(module.Stream()):  # exits, restoring the stream, however the capture ends
        graph.capture_begin(pool) if pool is not None else graph.capture_begin()
        try:
            out = fn()
            graph.capture_end()
        except BaseException:
            try:
                graph.capture_end()  # ends the stream's capture; raises again for a broken one
            except RuntimeError:
                pass
            module.synchronize()
            reset = module.CUDAGraph()
            with warnings.catch_warnings():  # "The CUDA Graph is empty": it is meant to be
                warnings.simplefilter("ignore", UserWarning)
                reset.capture_begin()
                reset.capture_end()
            raise
    return graph, out


def device_name(device: torch.device) -> str:
    """The card's name for benchmark records ("NVIDIA H100 80GB HBM3"), or the CPU's."""
    if device.type == "cpu":
        import platform

        return platform.processor() or "cpu"
    return torch.get_device_module(device).get_device_name(device)
