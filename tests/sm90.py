"""Compile Triton kernels for an H100/H200 (sm_90) on a machine without a GPU.

The interpreter runs a kernel as Python and misses compile-time rules: the first fused q/k/v
kernel ran under it and would not have compiled ("Mismatched type for heads between then block
and else block"), and the MoE layout kernel reused a name with another shape inside a loop. So
each kernel module's tests compile its kernels in a fresh process with the interpreter off:

    check_compiles('''
    from optimized.kernels import moe
    compile_for_sm90(moe._layout_kernel, {"top_w": "*fp32", ...}, {"K": 8, ...}, num_warps=4)
    ''')

The script runs with `compile_for_sm90` defined (and this repository on the path); it passes when
every compile does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_PRELUDE = '''
import os
os.environ["TRITON_INTERPRET"] = "0"
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_for_sm90(fn, types, consts, **options):
    """Compile `fn` for sm_90 and return the compiled kernel: `types` maps argument names to
    Triton types (others "i32"), `consts` the constexpr arguments to their values (those left out
    take their defaults, e.g. PDL=False), `options` e.g. num_warps."""
    names = fn.arg_names
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
    sig = {n: types.get(n, "i32") for n in names if n not in consts}
    sig.update({n: "constexpr" for n in consts})
    src = ASTSource(fn, sig, constexprs={(names.index(n),): v for n, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
'''


def check_compiles(script: str, timeout: int = 300) -> None:
    """Run `script` after the prelude above in a fresh process; skip where this Triton has no
    NVIDIA backend, fail with the compiler's message where a compile fails."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    code = _PRELUDE + textwrap.dedent(script) + '\nprint("compiled")\n'
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
