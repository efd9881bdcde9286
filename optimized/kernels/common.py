"""What the Triton kernel modules share: exact rounding to a storage dtype, the row tiling and
launch options, tl.dot operand settings, float32 device math (RMS of a tile, tanh, GELU) and the
host-side input checks. Kernels and their eager twins stay in their own modules (norms.py,
activation.py, rope.py, attention.py, moe.py); nothing here launches a kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import DOT_IN_STORAGE_DTYPE, INTERPRETING

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Default launch shape for modules without their own (the MoE router and combine): elements per
# program at most (unless one row is wider), and elements per warp. norms.py, activation.py and
# rope.py pass their own settings, which bench/kernel_bench.py sweeps.
TILE = 4096
WARP_ELEMS = 1024


# -- rounding and tiling (device) ----------------------------------------------------------------

# Where the float32 -> bfloat16 cast is exact (compiled: cvt.rn.bf16.f32, one instruction, round to
# nearest even) kernels cast; under the interpreter, which truncates that cast, they round with
# integer ops (round_to). Both give the same bits (NaN payloads aside). The integer rounding costs
# about 7 instructions where the cast costs 1, and the memory-bound kernels round an element 2-6
# times: on an H200 (more bandwidth per SM than an H100) that made some of them ALU-bound.
INTEGER_ROUNDING: tl.constexpr = tl.constexpr(INTERPRETING)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """Round float32 `x` to DTYPE, to nearest even, and return it as float32.

    Triton 3.9's interpreter truncates float32 -> bfloat16 casts (about half of random values
    come out one ULP toward zero, stores included), so there bfloat16 is rounded with integer
    ops, which are exact on every backend; casting the rounded value is then exact everywhere.
    Compiled, the cast itself rounds to nearest even (INTEGER_ROUNDING above).
    (The interpreter also mangles bfloat16 subnormals, below 1.2e-38; they do not occur here.)
    """
    if DTYPE == tl.bfloat16:
        if INTEGER_ROUNDING:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
        else:
            y = x.to(tl.bfloat16).to(tl.float32)
    elif DTYPE == tl.float16:
        y = x.to(tl.float16).to(tl.float32)
    else:
        y = x
    return y


@triton.jit
def store_rounded(ptrs, x, mask):
    """Store float32 `x` into `ptrs`, rounded to nearest even in the pointee dtype."""
    dtype = ptrs.dtype.element_ty
    if INTEGER_ROUNDING:
        tl.store(ptrs, round_to(x, dtype).to(dtype), mask=mask)
    else:
        tl.store(ptrs, x.to(dtype), mask=mask)


@triton.jit
def segment_tile(bounds, n, ROWS: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr = False):
    """(segment, tile within it, segment start, segment end) of this program (axis 0), for rows
    cut into n segments at bounds[0..n] (cu_seqlens of requests, offsets of experts) and tiles
    of ROWS rows numbered segment by segment. Found on the device, so the host never reads the
    bounds back and launches an upper bound of tiles; a spare program gets segment == n.
    BLOCK >= n (a power of two). REVERSE: program 0 takes the last tile (the GPU starts programs
    in id order, so the last tiles start first)."""
    tile = tl.program_id(0)
    if REVERSE:
        tile = tl.num_programs(0) - 1 - tile
    i = tl.arange(0, BLOCK)
    start = tl.load(bounds + i, mask=i < n, other=0)
    end = tl.load(bounds + i + 1, mask=i < n, other=0)
    n_tiles = (end - start + ROWS - 1) // ROWS
    tiles_end = tl.cumsum(n_tiles, 0)
    seg = tl.sum((tiles_end <= tile).to(tl.int32), 0)
    mine = i == seg
    first_tile = tl.sum(tl.where(mine, tiles_end - n_tiles, 0), 0)
    return seg, tile - first_tile, tl.sum(tl.where(mine, start, 0), 0), tl.sum(tl.where(mine, end, 0), 0)


# -- float32 math (device) -----------------------------------------------------------------------

@triton.jit
def rms_rows(x, w, cols, N: tl.constexpr, eps, HAS_WEIGHT: tl.constexpr):
    """RMSNorm of the float32 rows of tile `x` (zero past N), in reference.model.rms_norm's op
    order. div_rn/sqrt_rn round correctly everywhere; `/` and tl.sqrt may compile to approximations."""
    mean_sq = tl.div_rn(tl.sum(x * x, axis=1), N)
    y = x * tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def tanh_f32(z):
    """float32 tanh from tl.exp, the one transcendental every backend and the interpreter share
    (Triton's interpreter has no libdevice). 1 - 2 / (exp(2|z|) + 1) loses its relative accuracy
    near 0, so |z| < 0.55 (where tanh reaches 0.5) takes the Taylor series instead, truncated
    after z^17 (relative error < 6e-9). Within 2 float32 ULP of the correctly rounded tanh.

    Tried and reverted (2980388): a degree-4 minimax polynomial below 0.55 and exp(-2|z|) with a
    Newton reciprocal in FMAs above, no division: 22 instructions instead of about 40 (sm_90 SASS,
    bench/isa_count.py activation), within 2 ULP under the interpreter and 4 on an H200. But on the
    H200 the float32 scenario `fault-prefix-reuse-after-eviction` then failed its parity check
    (layers.4.out 1.93x its budget; it passes with this version): its errors, each small, did not
    average out over the MLP's sums as these do. A cheaper tanh must pass the GPU suite in float32."""
    a = tl.abs(z)
    large = 1.0 - tl.div_rn(2.0, tl.exp(2.0 * a) + 1.0)
    a2 = a * a
    p = 6404582.0 / 10854718875.0
    p = p * a2 - 929569.0 / 638512875.0
    p = p * a2 + 21844.0 / 6081075.0
    p = p * a2 - 1382.0 / 155925.0
    p = p * a2 + 62.0 / 2835.0
    p = p * a2 - 17.0 / 315.0
    p = p * a2 + 2.0 / 15.0
    p = p * a2 - 1.0 / 3.0
    small = a + a * a2 * p
    t = tl.where(a < 0.55, small, large)
    return tl.where(z < 0, -t, t)


@triton.jit
def gelu_tanh_f32(x):
    """torch's tanh-approximate GELU of float32 `x`, in its op order:
    0.5 * x * (1 + tanh(beta * (x + kappa * x^3)))."""
    inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
    return 0.5 * x * (1.0 + tanh_f32(inner))


# -- launch settings (host) ----------------------------------------------------------------------

def rows_per_program(n_rows: int, block: int, tile: int | None = None) -> int:
    """Rows of `block` columns per program: as many as fit `tile` elements (default TILE), at
    least one, at most the rows there are (rounded up to a power of two)."""
    return max(1, min(triton.next_power_of_2(max(n_rows, 1)), (tile or TILE) // block))


def launch_options(tile: int, warp_elems: int | None = None) -> dict:
    """Launch options for a program of `tile` elements (one warp per `warp_elems`, default
    WARP_ELEMS; 1 to 16 warps). No FMA contraction: the kernels reproduce torch's eager op
    sequence, which rounds every product, and a fused a * b + c skips that rounding (seen on an
    H100: a float16 RoPE compiled to fma.rn.f16, 5 of 32 outputs 1 ULP off)."""
    return dict(num_warps=min(max(tile // (warp_elems or WARP_ELEMS), 1), 16), enable_fp_fusion=False)


def dot_args(dtype: torch.dtype) -> dict:
    """tl.dot operands (DOT_DTYPE, DOT_PRECISION kernel arguments) for a model in `dtype`: in the
    storage dtype where compiled (tensor cores), in float32 under the interpreter, whose bf16/fp16
    dots are wrong (optimized/kernels/__init__.py). Float32 operands ask for "ieee" precision: a
    GPU's default (tf32) would drop float32 models to ~1e-3 accuracy. Other operands keep the
    backend's default (the flag only concerns float32)."""
    dot_dtype = TL_DTYPE[dtype] if DOT_IN_STORAGE_DTYPE else tl.float32
    return dict(DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if dot_dtype == tl.float32 else None)


# -- input checks (host; shapes, dtypes, devices, never values) ----------------------------------

def check_float(name: str, t, *, dim: int | tuple[int, ...] | None = None) -> None:
    """A float16/bfloat16/float32 tensor of the given rank(s) whose last dimension is contiguous."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (dim,) if isinstance(dim, int) else dim
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {list(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.device.type == "cpu" and not INTERPRETING:
        raise ValueError(f"{name} is on the CPU, where Triton kernels run only under TRITON_INTERPRET=1")
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")


def check_same(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in `others` shares `ref`'s dtype and device (None entries are skipped)."""
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def check_weight(name: str, w, width: int, device: torch.device) -> None:
    """A 1-D float weight of `width` entries on `device`."""
    check_float(name, w, dim=1)
    if w.shape[0] != width:
        raise ValueError(f"{name} must have shape [{width}], got {list(w.shape)}")
    if w.device != device:
        raise ValueError(f"{name} is on {w.device}, the activations on {device}")


def check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
