"""Instruction counts of Triton kernels compiled for an H100/H200 (sm_90) on a machine without a
GPU: a measuring tool, not a test. A count, not a time: the GPU is not consulted.

Two kernel families, one subcommand each:

- `activation`: `_gelu_tanh_mul_kernel` and `_softcap_kernel` (optimized/kernels/activation.py),
  i.e. the float32 tanh/GELU device math of optimized/kernels/common.py (tanh_f32,
  gelu_tanh_f32), with the launch options the kernels use for a wide row (launch_options:
  enable_fp_fusion=False, BLOCK=1024 columns, ROWS rows, one warp per WARP_ELEMS elements).
- `qkv`: the fused q/k/v epilogue (rope._qkv_norm_rope_store_kernel), at each launch shape
  (tokens, head size, with or without the K/V part) with the constexprs, warps and options that
  rope.qkv_launch gives qkv_norm_rope_store.

How (shared by both):

- Compile with TRITON_INTERPRET=0 (as tests/sm90.py does), with the argument specialization
  Triton's JIT would give the launch where the tool knows the launch's integers (pointers and
  integers that are multiples of 16 marked divisible by 16, an integer 1 made a constant; the
  vector width of loads and stores follows from them), constexprs left out at their defaults
  (PDL=False: no griddepcontrol). The activation kernels are compiled without integer values,
  so without divisibility hints (scalar loads), as their tool always measured them.
- PTX is Triton's; SASS is nvdisasm's of the cubin (with line info, so that instructions map to
  source lines).
- Each listing is walked as a control-flow graph. The program's path is the shortest way from
  the entry to an exit: it skips the out-of-line slow paths that never run at these operands
  (div.rn's for rare operands, cosf/sinf's past 105615, sqrt.rn's), each a branch around a
  MOV/CALL/MOV or a longer block. A conditional branch that both ways is real (the q/KV split
  of the qkv kernel, found as the branch whose two sides share the least code) is taken each
  way, its sides told apart by the source lines of the _q_heads and _kv_heads calls.
- Counts are per element written: instructions of all a program's threads divided by the
  elements the program writes.

activation prints per kernel: PTX (the kernel body), SASS all (with the out-of-line slow path
and the trailing self-branch after the main body's EXIT), SASS main (up to that EXIT) and SASS
fast path (the shortest path), in total and per element, and as the marginal cost of one more
element per thread (ROWS 2 -> 4 at the same number of warps), which leaves out the per-program
index and mask work.

qkv prints per launch shape and per side of the branch (q: the query heads of its tokens; kv: k
and v rows): instructions a thread runs and per element written; per launch, the sum over its
programs per element written.

    python bench/isa_count.py activation [--dtype bf16|fp32|both] [--block 1024] [--ops] [--dump DIR]
    python bench/isa_count.py qkv                  # the E2B shapes, T = 8192 and decode sizes
    python bench/isa_count.py qkv --tokens 8192 --d 512 --breakdown [--module OLD_ROPE.py] [--set NAME=INT]
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter, deque
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before any kernel is defined: compile, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from optimized.kernels import activation, common, rope  # noqa: E402

NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
CUOBJDUMP = NVDISASM.with_name("cuobjdump")
TL_TYPE = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


# -- compile -----------------------------------------------------------------------------------

def compile_sm90(fn, types: dict, ints: dict, consts: dict, options: dict):
    """triton.compile of `fn` for sm_90 with the JIT's argument specialization.

    types: Triton type of each pointer or float argument (pointers are marked divisible by 16
    when `ints` is given: torch's allocations are); ints: the launch's value of each integer
    argument, or None for all of them to compile without divisibility hints (plain i32);
    consts: constexprs (those left out take their defaults, e.g. PDL=False)."""
    names = fn.arg_names
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **consts}
    sig, attrs = {}, {}
    for n in names:
        if n in consts:
            continue
        if n in types:
            sig[n] = types[n]
            if ints is not None and types[n].startswith("*"):
                attrs[(names.index(n),)] = [["tt.divisibility", 16]]
        elif ints is not None and ints[n] == 1:  # the JIT makes an integer 1 a constant
            consts[n] = 1
        else:
            sig[n] = "i32"
            if ints is not None and ints[n] % 16 == 0:
                attrs[(names.index(n),)] = [["tt.divisibility", 16]]
    sig.update({n: "constexpr" for n in consts})
    src = ASTSource(fn, sig, constexprs={(names.index(n),): v for n, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def disassemble(kernel) -> tuple[str, int, int]:
    """nvdisasm -g -gi of the kernel's cubin (source lines with their inlining chains), and its
    registers and local memory per thread (cuobjdump -res-usage)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass = subprocess.run([str(NVDISASM), "-g", "-gi", "-c", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    return sass, int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"LOCAL:(\d+)", usage).group(1))


# -- listings and their control flow -----------------------------------------------------------

class Listing:
    """Instructions of one function in order: opcode (with its modifiers, predicate left out),
    source chain (outermost last), branch target label or None, whether it is conditional
    (predicated), whether it ends the program (exit)."""

    def __init__(self):
        self.ops: list[str] = []
        self.chains: list[tuple] = []
        self.targets: list[str | None] = []
        self.conditional: list[bool] = []
        self.exits: list[bool] = []
        self.labels: dict[str, int] = {}

    def add(self, op, chain, target=None, conditional=False, exit_=False):
        self.ops.append(op)
        self.chains.append(chain)
        self.targets.append(target)
        self.conditional.append(conditional)
        self.exits.append(exit_)

    def ends(self, i) -> bool:
        # a predicated EXIT/ret only ends the threads whose predicate holds: go on past it
        return self.exits[i] and not self.conditional[i]

    def successors(self, i):
        if self.ends(i):
            return []
        out = [] if self.targets[i] is None else [self.labels[self.targets[i]]]
        if self.targets[i] is None or self.conditional[i]:
            out.append(i + 1)
        return [j for j in out if j < len(self.ops)]

    def first_exit(self) -> int:
        """Index of the first unconditional exit: the end of the main body (after it come the
        out-of-line slow paths, reached only by CALL, and the trailing self-branch)."""
        return next((i for i in range(len(self.ops)) if self.ends(i)), len(self.ops) - 1)

    def distances_to_exit(self):
        """Fewest instructions from each instruction to an exit (itself included)."""
        preds = [[] for _ in self.ops]
        for i in range(len(self.ops)):
            for j in self.successors(i):
                preds[j].append(i)
        dist = [1 if self.ends(i) else None for i in range(len(self.ops))]
        queue = deque(i for i, d in enumerate(dist) if d)
        while queue:
            j = queue.popleft()
            for i in preds[j]:
                if dist[i] is None:
                    dist[i] = dist[j] + 1
                    queue.append(i)
        return dist

    def path(self, start=0):
        """The instructions of a shortest path from `start` to an exit."""
        to_exit = self.distances_to_exit()
        out, i = [], start
        while True:
            out.append(i)
            if self.ends(i):
                return out
            i = min(self.successors(i), key=lambda j: to_exit[j] if to_exit[j] is not None else 1 << 30)

    def path_to(self, target):
        """A shortest path from the entry to instruction `target`, target included (None if it
        cannot be reached)."""
        parent = {0: None}
        queue = deque([0])
        while queue and target not in parent:
            i = queue.popleft()
            for j in self.successors(i):
                if j not in parent:
                    parent[j] = i
                    queue.append(j)
        if target not in parent:
            return None
        out, i = [], target
        while i is not None:
            out.append(i)
            i = parent[i]
        return out[::-1]

    def reach(self, start):
        seen, stack = set(), [start]
        while stack:
            i = stack.pop()
            if i in seen or i >= len(self.ops):
                continue
            seen.add(i)
            stack.extend(self.successors(i))
        return seen


def parse_sass(text: str, kernel_name: str) -> Listing:
    """nvdisasm -g -gi output, the kernel's own section only."""
    lst = Listing()
    chain, fresh, in_kernel = [], True, False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("//----") and ".text." in s:
            in_kernel = s.split(".text.")[1].split()[0] == kernel_name
            continue
        if not in_kernel:
            continue
        m = re.match(r'//## File "(.+?)", line (\d+)(?: inlined at "(.+?)", line (\d+))?', s)
        if m:  # one line per level of inlining, innermost first, before the instructions
            if fresh:
                chain, fresh = [], False
            chain.append((m.group(1), int(m.group(2))))
            continue
        if re.match(r"^\.L_x_\d+:$", s) or re.match(r"^\$\S+:$", s):
            lst.labels[s[:-1]] = len(lst.ops)
            continue
        m = re.match(r"/\*[0-9a-f]+\*/\s+(.*?);", s)
        if not m:
            continue
        fresh = True
        op = m.group(1).strip()
        pred = op.startswith("@")
        body = op.split(None, 1)[1] if pred else op
        name = body.split()[0]
        if name.startswith("BRA"):
            lst.add(name, tuple(chain), re.search(r"`\((\S+?)\)", body).group(1), conditional=pred)
        else:
            lst.add(name, tuple(chain), conditional=pred, exit_=name.startswith(("EXIT", "RET")))
    return lst


def parse_ptx(text: str, kernel_name: str) -> Listing:
    """Triton's PTX, the kernel's .entry body (labels, directives, braces and debug info out);
    source chains from its .loc lines."""
    files = {int(m.group(1)): m.group(2) for m in re.finditer(r'\.file\s+(\d+)\s+"(.+?)"', text)}
    lst = Listing()
    chain = ()
    body = text.split(f".entry {kernel_name}", 1)[1]
    for line in body[body.index("{"):].splitlines():
        s = line.split("//")[0].strip()
        if s.startswith(".loc"):
            m = re.match(r"\.loc\s+(\d+)\s+(\d+)\s+\d+(?:,.*inlined_at\s+(\d+)\s+(\d+))?", s)
            if m:
                inner = (files.get(int(m.group(1))), int(m.group(2)))
                chain = (inner, (files.get(int(m.group(3))), int(m.group(4)))) if m.group(3) else (inner,)
            continue
        if re.match(r"^\$\S+:$", s):
            lst.labels[s[:-1]] = len(lst.ops)
            continue
        if not s or s.startswith((".", "{", "}", "(", ")")) or not s.endswith(";"):
            continue
        pred = s.startswith("@")
        op = s.split(None, 1)[1] if pred else s
        name = op.split()[0].rstrip(";")
        if name.startswith("bra"):
            lst.add(name, chain, op.split()[1].rstrip(";"), conditional=pred)
        else:
            lst.add(name, chain, conditional=pred, exit_=name == "ret")
    return lst


def histogram(lst: Listing, indices) -> Counter:
    return Counter(lst.ops[i] for i in indices)


# -- activation --------------------------------------------------------------------------------

ACTIVATION_KERNELS = {
    "gelu_tanh_mul": (activation._gelu_tanh_mul_kernel, ("gate", "up", "out"), {}),
    "softcap": (activation._softcap_kernel, ("x", "out"), {"cap": "fp32"}),
}


def activation_counts(name: str, dtype: str, rows: int, block: int, dump: str) -> dict:
    """Counts of one activation kernel at ROWS=rows, with the warps of the ROWS=2 program (so that
    ROWS 2 -> 4 adds elements per thread, not threads)."""
    fn, pointers, floats = ACTIVATION_KERNELS[name]
    options = common.launch_options(2 * block, activation.WARP_ELEMS)
    types = {**{p: TL_TYPE[dtype] for p in pointers}, **floats}
    kernel = compile_sm90(fn, types, None, dict(ROWS=rows, BLOCK=block), options)
    sass_text, _, _ = disassemble(kernel)
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
        Path(dump, f"{name}_{dtype}_r{rows}.ptx").write_text(kernel.asm["ptx"])
        Path(dump, f"{name}_{dtype}_r{rows}.sass").write_text(sass_text)
    ptx, sass = parse_ptx(kernel.asm["ptx"], fn.__name__), parse_sass(sass_text, fn.__name__)
    main = range(sass.first_exit() + 1)
    # The fast path is the shortest path: the main body less the blocks a branch skips, which
    # here are only the calls of div.rn's slow path (the branch around each one stays counted).
    return dict(threads=32 * options["num_warps"], options=options,
                ptx=len(ptx.ops), ptx_ops=histogram(ptx, range(len(ptx.ops))),
                all=len(sass.ops), main=len(main), fast=len(sass.path()), sass_ops=histogram(sass, main))


def _opcodes(ops: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]))


def run_activation(args) -> None:
    for dtype in (("bf16", "fp32") if args.dtype == "both" else (args.dtype,)):
        for name in ACTIVATION_KERNELS:
            two = activation_counts(name, dtype, 2, args.block, args.dump)
            four = activation_counts(name, dtype, 4, args.block, args.dump)
            e2, e4 = 2 * args.block // two["threads"], 4 * args.block // two["threads"]
            print(f"{name} [{dtype}]  BLOCK={args.block} ROWS=2, {two['threads']} threads "
                  f"({e2} elements a thread), {two['options']}")
            for key, what in (("ptx", "PTX"), ("all", "SASS all"), ("main", "SASS main"), ("fast", "SASS fast path")):
                print(f"  {what:<14} {two[key]:5d} instructions = {two[key] / e2:6.1f} per element; "
                      f"marginal (ROWS 2->4) {(four[key] - two[key]) / (e4 - e2):6.1f} per element")
            if args.ops:
                print("  SASS main opcodes: " + _opcodes(two["sass_ops"]))
                print("  PTX opcodes: " + _opcodes(two["ptx_ops"]))


# -- qkv: the fused q/k/v epilogue -------------------------------------------------------------

def use_rope_module(path: str) -> None:
    """Measure the kernel of another copy of rope.py (e.g. `git show HEAD:optimized/kernels/rope.py`),
    loaded as a module of optimized.kernels, instead of this tree's."""
    global rope
    spec = importlib.util.spec_from_file_location("optimized.kernels._rope_measured", path)
    rope = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rope)


def qkv_launch(T, hq, hkv, d, v_is_k):
    """rope.qkv_launch, or for a rope.py from before it (2-D grid: token tiles x head groups, the
    K/V groups as wide in tokens as the q groups), the launch qkv_norm_rope_store made then."""
    if hasattr(rope, "qkv_launch"):
        return rope.qkv_launch(T, hq, hkv, d, v_is_k)
    block_half = triton.next_power_of_2(d // 2)
    most_heads = max(1, rope.QKV_TILE // (2 * block_half))
    q_heads = min(triton.next_power_of_2(hq), most_heads)
    kv_heads = min(triton.next_power_of_2(max(hkv, 1)), most_heads)
    tokens = common.rows_per_program(T, 2 * block_half * q_heads, rope.QKV_TILE)
    q_groups = triton.cdiv(hq, q_heads)
    grid = (triton.cdiv(T, tokens), q_groups + triton.cdiv(hkv, kv_heads))
    consts = dict(HQ=hq, HKV=hkv, D=d, HALF=d // 2, BLOCK_HALF=block_half, TOKENS=tokens, Q_HEADS=q_heads,
                  KV_HEADS=kv_heads, Q_GROUPS=q_groups, V_IS_K=v_is_k)
    return grid, consts, common.launch_options(tokens * q_heads * 2 * block_half, rope.QKV_WARP_ELEMS)


def qkv_programs(T, hkv, grid, consts):
    """Programs of the launch on each side: {"q": n, "kv": n}, and the tokens of a K/V program."""
    if "KV_TOKENS" in consts:
        kv_tokens = consts["KV_TOKENS"]
        progs = {"q": triton.cdiv(T, consts["TOKENS"]) * consts["Q_GROUPS"],
                 "kv": triton.cdiv(T, kv_tokens) * consts["KV_GROUPS"] if hkv else 0}
    else:
        kv_tokens = consts["TOKENS"]
        progs = {"q": grid[0] * consts["Q_GROUPS"], "kv": grid[0] * (grid[1] - consts["Q_GROUPS"])}
    assert sum(progs.values()) == math.prod(grid), (progs, grid)
    return progs, kv_tokens


def compile_qkv(T: int, hq: int, hkv: int, d: int, dtype: str = "bf16", v_is_k: bool = False,
                num_slots: int = 8192 * 4 + 1):
    """The compiled kernel and the launch (grid, consts, options) at T tokens, q/k/v views of one
    fused [T, (hq + 2 hkv) d] projection, pools [num_slots, hkv, d] (the q-only launch: hkv = 0,
    with qkv_norm_rope_store's stand-ins)."""
    grid, consts, options = qkv_launch(T, hq, hkv, d, v_is_k)
    width = (hq + 2 * hkv) * d
    pool_row = (hkv or hq) * d  # q-only stand-ins: k = v = q, pools = q_out [T, hq, d]
    ints = dict(T=T, num_slots=num_slots if hkv else T, stride_q0=width, stride_q1=d,
                stride_k0=width, stride_k1=d, stride_v0=width, stride_v1=d,
                stride_kp0=pool_row, stride_kp1=d, stride_vp0=pool_row, stride_vp1=d)
    types = {n: TL_TYPE[dtype] for n in ("q", "k", "v", "q_w", "k_w", "q_out", "k_pool", "v_pool")}
    types.update(positions="*i64", inv_freq="*fp32", slots="*i64", eps="fp32")
    kernel = compile_sm90(rope._qkv_norm_rope_store_kernel, types, ints, consts, options)
    return kernel, (grid, consts, options)


def _call_lines(kernel_fn, callee: str) -> set[int]:
    """Source lines (absolute) of the calls to `callee` in the kernel's body."""
    src, first = inspect.getsourcelines(kernel_fn)
    lines = set()
    for node in ast.walk(ast.parse("".join(src).lstrip())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == callee:
            lines.update(range(first + node.lineno - 1, first + node.end_lineno))
    return lines


def qkv_sides(lst: Listing, q_lines: set[int], kv_lines: set[int]) -> dict:
    """{"q": path, "kv": path}: each a shortest path from the entry through that side of the
    kernel's q/KV branch to an exit; one path "q" when there is no such branch. The branch is
    the reachable conditional one whose two sides share the least code (at least 16 instructions
    on each side of their own: the slow-path branches differ by a few)."""
    best, best_score, reachable = None, 0, lst.reach(0)
    for i in range(len(lst.ops)):
        if not (lst.targets[i] and lst.conditional[i]) or i not in reachable:
            continue
        a, b = lst.reach(i + 1), lst.reach(lst.labels[lst.targets[i]])
        score = min(len(a - b), len(b - a))
        if score > best_score:
            best, best_score = (i, a - b, b - a), score
    if best is None or best_score < 16:
        return {"q": lst.path()}
    i, only_fall, only_taken = best

    def q_minus_kv(region):  # by the outermost source line: the kernel's own
        def votes(lines):
            return sum(1 for k in region if lst.chains[k] and lst.chains[k][-1][1] in lines)
        return votes(q_lines) - votes(kv_lines)

    prefix = lst.path_to(i)
    fall, taken = prefix + lst.path(i + 1), prefix + lst.path(lst.labels[lst.targets[i]])
    if q_minus_kv(only_fall) >= q_minus_kv(only_taken):
        return {"q": fall, "kv": taken}
    return {"q": taken, "kv": fall}


def _function_ranges():
    """(file, first line, last line, name) of the functions in rope.py and common.py."""
    out = []
    for mod in (rope, common):
        path = inspect.getsourcefile(mod)
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.FunctionDef):
                out.append((path, node.lineno, node.end_lineno, node.name))
    return out


def innermost_function(chain, ranges) -> str:
    if not chain:
        return "?"
    f, ln = chain[0]
    # the nearest function starting at or above the line: the inlined libdevice code of tl.cos
    # and tl.sin is given lines just past the function that calls them
    starts = [(a, name) for path, a, b, name in ranges if path == f and a <= ln]
    return max(starts)[1] if starts else (Path(f).name if f else "?")


def measure_qkv(T, hq, hkv, d, dtype="bf16", v_is_k=False, breakdown=False) -> dict:
    kernel, (grid, consts, options) = compile_qkv(T, hq, hkv, d, dtype, v_is_k)
    name = rope._qkv_norm_rope_store_kernel.__name__
    sass_text, regs, local = disassemble(kernel)
    sass, ptx = parse_sass(sass_text, name), parse_ptx(kernel.asm["ptx"], name)
    fn = rope._qkv_norm_rope_store_kernel.fn
    q_lines, kv_lines = _call_lines(fn, "_q_heads"), _call_lines(fn, "_kv_heads")
    sass_paths, ptx_paths = qkv_sides(sass, q_lines, kv_lines), qkv_sides(ptx, q_lines, kv_lines)
    threads = options["num_warps"] * 32
    programs, kv_tokens = qkv_programs(T, hkv, grid, consts)
    elems = {"q": consts["TOKENS"] * min(consts["Q_HEADS"], hq) * d,
             "kv": 2 * kv_tokens * min(consts["KV_HEADS"], hkv) * d}
    row = dict(grid=grid, tokens=consts["TOKENS"], kv_tokens=kv_tokens, q_heads=consts["Q_HEADS"],
               kv_heads=consts["KV_HEADS"], warps=options["num_warps"], regs=regs, local=local,
               smem=kernel.metadata.shared, sides={})
    launch = {"ptx": 0, "sass": 0}
    for side in ("q", "kv"):
        if side not in sass_paths or not programs[side]:
            continue
        n_ptx, n_sass = len(ptx_paths[side]), len(sass_paths[side])
        s = row["sides"][side] = dict(ptx=n_ptx, sass=n_sass, ptx_per_elem=n_ptx * threads / elems[side],
                                      sass_per_elem=n_sass * threads / elems[side])
        launch["ptx"] += programs[side] * n_ptx * threads
        launch["sass"] += programs[side] * n_sass * threads
        if breakdown:
            ranges = _function_ranges()
            s["by_function"] = Counter(innermost_function(sass.chains[i], ranges) for i in sass_paths[side])
            s["by_op"] = Counter(sass.ops[i].split(".")[0] for i in sass_paths[side])
    written = T * hq * d + 2 * T * hkv * d
    row["launch_ptx_per_elem"] = launch["ptx"] / written
    row["launch_sass_per_elem"] = launch["sass"] / written
    return row


def run_qkv(args) -> None:
    if args.module:
        use_rope_module(args.module)
    for setting in args.set:
        name, value = setting.split("=")
        if not hasattr(rope, name):
            raise SystemExit(f"rope.py has no setting {name}")
        setattr(rope, name, int(value))
    print(f"{'T':>5} {'D':>4} {'Hkv':>3} {'programs':>8} {'tok':>3} {'qh':>2} {'kvtok':>5} {'kvh':>3} {'warps':>5} "
          f"{'regs':>4} {'q ptx/thr':>9} {'q sass/thr':>10} {'q ptx/el':>8} {'q sass/el':>9} "
          f"{'kv ptx/thr':>10} {'kv sass/thr':>11} {'kv ptx/el':>9} {'kv sass/el':>10} "
          f"{'launch ptx/el':>13} {'launch sass/el':>14}")
    for T in args.tokens:
        for d in args.d:
            for hkv in args.hkv:
                r = measure_qkv(T, args.hq, hkv, d, args.dtype, args.v_is_k, args.breakdown)
                q, kv = r["sides"].get("q", {}), r["sides"].get("kv", {})

                def f(s, k, fmt):
                    return format(s[k], fmt) if k in s else "-"

                print(f"{T:>5} {d:>4} {hkv:>3} {math.prod(r['grid']):>8} {r['tokens']:>3} {r['q_heads']:>2} "
                      f"{r['kv_tokens']:>5} {r['kv_heads']:>3} {r['warps']:>5} {r['regs']:>4} "
                      f"{f(q, 'ptx', '9d'):>9} {f(q, 'sass', '10d'):>10} {f(q, 'ptx_per_elem', '8.1f'):>8} "
                      f"{f(q, 'sass_per_elem', '9.1f'):>9} {f(kv, 'ptx', '10d'):>10} {f(kv, 'sass', '11d'):>11} "
                      f"{f(kv, 'ptx_per_elem', '9.1f'):>9} {f(kv, 'sass_per_elem', '10.1f'):>10} "
                      f"{r['launch_ptx_per_elem']:>13.1f} {r['launch_sass_per_elem']:>14.1f}", flush=True)
                if args.breakdown:
                    for side, s in r["sides"].items():
                        print(f"      {side} by function: {dict(s['by_function'].most_common())}")
                        print(f"      {side} by opcode:   {dict(s['by_op'].most_common(25))}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="kernel", required=True)

    a = sub.add_parser("activation", help="_gelu_tanh_mul_kernel and _softcap_kernel")
    a.add_argument("--dtype", default="bf16", choices=("bf16", "fp32", "both"))
    a.add_argument("--block", type=int, default=1024)
    a.add_argument("--dump", default="", help="directory to write the PTX/SASS into")
    a.add_argument("--ops", action="store_true", help="also print the opcode histogram (per program)")
    a.set_defaults(run=run_activation)

    q = sub.add_parser("qkv", help="the fused q/k/v epilogue, _qkv_norm_rope_store_kernel")
    q.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64, 8192])
    q.add_argument("--d", nargs="+", type=int, default=[256, 512])
    q.add_argument("--hq", type=int, default=8)
    q.add_argument("--hkv", nargs="+", type=int, default=[1, 0], help="0: the q-only launch of KV-shared layers")
    q.add_argument("--dtype", default="bf16", choices=sorted(TL_TYPE))
    q.add_argument("--v-is-k", action="store_true")
    q.add_argument("--breakdown", action="store_true", help="SASS of each path by innermost function and opcode")
    q.add_argument("--set", nargs="*", default=[], metavar="NAME=INT",
                   help="launch settings of rope.py to try instead of its own, e.g. QKV_WARP_ELEMS=1024")
    q.add_argument("--module", help="measure this copy of rope.py instead (e.g. the one before a change)")
    q.set_defaults(run=run_qkv)

    args = p.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
