"""Instructions per element of the elementwise activation kernels, compiled for an H100/H200
(sm_90) without a GPU: a measuring tool for the float32 tanh/GELU device math in
optimized/kernels/common.py (tanh_f32, gelu_tanh_f32), not a test.

Compiles `_gelu_tanh_mul_kernel` and `_softcap_kernel` (optimized/kernels/activation.py) in a
fresh process with TRITON_INTERPRET=0, as tests/sm90.py does, with the launch options the kernels
use for a wide row (launch_options: enable_fp_fusion=False, BLOCK=1024 columns, ROWS rows, one
warp per WARP_ELEMS elements), and counts from the compiled kernel:

- PTX: instructions of the kernel body (labels, directives and debug info left out);
- SASS (where nvdisasm is available): all instructions; those of the main body (up to its
  unconditional EXIT; after it comes the out-of-line slow path of div.rn.f32 and the trailing
  self-branch); and the fast path, i.e. the main body less the blocks that only call that slow
  path (a branch around MOV/CALL/MOV per division, taken for rare operands).

Each count is shown in total and per element (divided by the elements per thread), and as the
marginal cost of one more element per thread (ROWS 2 -> 4 at the same number of warps), which
leaves out the per-program index and mask work.

    python bench/activation_isa.py [--dtype bf16|fp32|both] [--dump DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r'''
import json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from optimized.kernels import activation
from optimized.kernels.common import launch_options

def compile_for_sm90(fn, types, consts, **options):
    names = fn.arg_names
    sig = {n: types.get(n, "i32") for n in names if n not in consts}
    sig.update({n: "constexpr" for n in consts})
    src = ASTSource(fn, sig, constexprs={(names.index(n),): v for n, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)

dtype, rows, block, dump = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
opts = launch_options(2 * block, activation.WARP_ELEMS)  # the warps of the ROWS=2 program
out = {}
for name, fn, types in (
        ("gelu_tanh_mul", activation._gelu_tanh_mul_kernel, dict(gate=f"*{dtype}", up=f"*{dtype}", out=f"*{dtype}")),
        ("softcap", activation._softcap_kernel, dict(x=f"*{dtype}", out=f"*{dtype}", cap="fp32"))):
    k = compile_for_sm90(fn, types, dict(ROWS=rows, BLOCK=block), **opts)
    try:
        sass = k.asm["sass"]
    except Exception:  # no nvdisasm
        sass = None
    out[name] = dict(ptx=k.asm["ptx"], sass=sass, threads=32 * opts["num_warps"], options=opts)
    if dump:
        Path = __import__("pathlib").Path
        Path(dump).mkdir(parents=True, exist_ok=True)
        Path(dump, f"{name}_{dtype}_r{rows}.ptx").write_text(k.asm["ptx"])
        if sass:
            Path(dump, f"{name}_{dtype}_r{rows}.sass").write_text(sass)
print(json.dumps(out))
'''


def _compile(dtype: str, rows: int, block: int, dump: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _CHILD, dtype, str(rows), str(block), dump or ""], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def ptx_count(ptx: str) -> dict:
    """Instructions in the .entry body of `ptx` (labels, directives, braces and debug lines out)."""
    body = ptx.split(".entry", 1)[1]
    body = body[body.index("{") + 1:body.index("$L__func_end0") if "$L__func_end0" in body else None]
    ops: dict[str, int] = {}
    for line in body.splitlines():
        line = line.split("//", 1)[0].strip()
        if not line or line.startswith((".", "$", "{", "}")) or line.endswith(":"):
            continue
        op = re.sub(r"^@!?%\w+\s+", "", line).split()[0].rstrip(";")
        ops[op] = ops.get(op, 0) + 1
    return dict(total=sum(ops.values()), ops=ops)


def _sass_lines(sass: str) -> list[str]:
    """Instruction and label lines of nvdisasm's output ("ctrl\\tOPCODE ...;" or "LBBn:")."""
    lines = []
    for raw in sass.splitlines():
        raw = raw.strip()
        if re.match(r"^[\w.]+:$", raw) and not raw.startswith("Function"):
            lines.append(raw)
        elif ";" in raw and not raw.startswith(("//", ".")):
            lines.append(raw.split("\t", 1)[-1] if "\t" in raw else re.sub(r"^/\*[0-9a-f]+\*/\s*", "", raw))
    return lines


def sass_count(sass: str) -> dict:
    lines = _sass_lines(sass)
    insts = [l for l in lines if not l.endswith(":")]
    main_end = next((i for i, l in enumerate(lines) if re.match(r"^EXIT\b", l)), len(lines) - 1)
    main = lines[:main_end + 1]
    slow = 0  # instructions in blocks skipped by "@P BRA LBBn" that only call the div slow path
    i = 0
    while i < len(main):
        m = re.match(r"^@!?U?P\w+\s+BRA\s+(\w+);", main[i])
        if m and f"{m.group(1)}:" in main[i + 1:]:
            j = main.index(f"{m.group(1)}:", i + 1)
            block = [l for l in main[i + 1:j] if not l.endswith(":")]
            if any(l.startswith("CALL") for l in block):
                slow += len(block)  # the branch around it runs; the block does not
                i = j
        i += 1
    ops: dict[str, int] = {}
    for l in main:
        if not l.endswith(":"):
            op = re.sub(r"^@!?U?P\w+\s+", "", l).split()[0].rstrip(";")
            ops[op] = ops.get(op, 0) + 1
    n_main = sum(ops.values())
    return dict(total=len(insts), main=n_main, fast=n_main - slow, ops=ops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32", "both"))
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--dump", default="", help="directory to write the PTX/SASS into")
    ap.add_argument("--ops", action="store_true", help="also print the opcode histogram (per program)")
    args = ap.parse_args()
    for dtype in (("bf16", "fp32") if args.dtype == "both" else (args.dtype,)):
        two, four = _compile(dtype, 2, args.block, args.dump), _compile(dtype, 4, args.block, args.dump)
        for name in two:
            threads = two[name]["threads"]
            e2, e4 = 2 * args.block // threads, 4 * args.block // threads
            print(f"{name} [{dtype}]  BLOCK={args.block} ROWS=2, {threads} threads "
                  f"({e2} elements a thread), {two[name]['options']}")
            p2, p4 = ptx_count(two[name]["ptx"]), ptx_count(four[name]["ptx"])
            print(f"  PTX          {p2['total']:5d} instructions = {p2['total'] / e2:6.1f} per element; "
                  f"marginal (ROWS 2->4) {(p4['total'] - p2['total']) / (e4 - e2):6.1f} per element")
            if two[name]["sass"]:
                s2, s4 = sass_count(two[name]["sass"]), sass_count(four[name]["sass"])
                for key, what in (("total", "SASS all"), ("main", "SASS main"), ("fast", "SASS fast path")):
                    print(f"  {what:<14} {s2[key]:5d} instructions = {s2[key] / e2:6.1f} per element; "
                          f"marginal (ROWS 2->4) {(s4[key] - s2[key]) / (e4 - e2):6.1f} per element")
                if args.ops:
                    print("  SASS main opcodes: " + ", ".join(f"{k} {v}" for k, v in
                                                            sorted(s2["ops"].items(), key=lambda kv: -kv[1])))
            else:
                print("  SASS: not available (no nvdisasm)")
            if args.ops:
                print("  PTX opcodes: " + ", ".join(f"{k} {v}" for k, v in
                                                  sorted(p2["ops"].items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
