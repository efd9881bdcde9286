"""Instruction counts of the fused q/k/v epilogue kernel (rope._qkv_norm_rope_store_kernel) as
compiled for an H100/H200 (sm_90), on a machine without a GPU: a measuring tool, not a test.

For each launch shape (tokens, head size, with or without the K/V part) the kernel is compiled
with the constexprs, warps and options that rope.qkv_launch gives qkv_norm_rope_store, and with
the argument specialization Triton's JIT would give it at that launch (pointers and the integer
arguments that are multiples of 16 marked divisible by 16, an integer 1 made a constant), since
the vector width of the loads and stores follows from them. The PTX (Triton's) and the SASS
(nvdisasm of the cubin, with line info) are then walked: the program's path is the shortest
way through the control flow from the entry to an exit, which skips the slow paths of cosf/sinf
(arguments past 105615), div.rn and sqrt.rn that never run at these positions, and the kernel's
one real branch (query heads or key/value heads, found as the branch whose two sides share the
least code) is taken each way, its sides told apart by the source lines of the _q_heads and
_kv_heads calls. Reported per side: instructions a thread runs, and instructions of all the
program's threads per element it writes (q: the query heads of its tokens; kv: k and v rows);
per launch, the sum over its programs per element written. A count, not a time: the GPU is not
consulted.

    python bench/rope_isa.py                      # the E2B shapes, T = 8192 and decode sizes
    python bench/rope_isa.py --tokens 8192 --d 512 --breakdown
"""

from __future__ import annotations

import argparse
import ast
import inspect
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter, deque
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before the kernels are defined: compile, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from optimized.kernels import common, rope  # noqa: E402

TL_TYPE = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
CUOBJDUMP = NVDISASM.with_name("cuobjdump")
KERNEL = rope._qkv_norm_rope_store_kernel


def use_module(path: str) -> None:
    """Measure the kernel of another copy of rope.py (e.g. `git show HEAD:optimized/kernels/rope.py`),
    loaded as a module of optimized.kernels, instead of this tree's."""
    import importlib.util

    global rope, KERNEL
    spec = importlib.util.spec_from_file_location("optimized.kernels._rope_measured", path)
    rope = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rope)
    KERNEL = rope._qkv_norm_rope_store_kernel


def launch_of(T, hq, hkv, d, v_is_k):
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


def programs_of(T, hkv, grid, consts):
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


def _specialized(value: int) -> bool:
    return value % 16 == 0


def compile_shape(T: int, hq: int, hkv: int, d: int, dtype: str = "bf16", v_is_k: bool = False,
                  num_slots: int = 8192 * 4 + 1):
    """The compiled kernel (triton.compile's result) and the launch (grid, consts, options) for a
    launch at T tokens, q/k/v views of one fused [T, (hq + 2 hkv) d] projection, pools
    [num_slots, hkv, d] (the q-only launch: hkv = 0, with qkv_norm_rope_store's stand-ins)."""
    grid, consts, options = launch_of(T, hq, hkv, d, v_is_k)
    width = (hq + 2 * hkv) * d
    ints = dict(T=T, num_slots=num_slots if hkv else T, stride_q0=width, stride_q1=d)
    if hkv:
        ints.update(stride_k0=width, stride_k1=d, stride_v0=width, stride_v1=d,
                    stride_kp0=hkv * d, stride_kp1=d, stride_vp0=hkv * d, stride_vp1=d)
    else:  # stand-ins: k = v = q, pools = q_out [T, hq, d]
        ints.update(stride_k0=width, stride_k1=d, stride_v0=width, stride_v1=d,
                    stride_kp0=hq * d, stride_kp1=d, stride_vp0=hq * d, stride_vp1=d)
    pointers = {n: TL_TYPE[dtype] for n in ("q", "k", "v", "q_w", "k_w", "q_out", "k_pool", "v_pool")}
    pointers.update(positions="*i64", inv_freq="*fp32", slots="*i64")
    names = KERNEL.arg_names
    consts = dict(consts)
    sig, attrs = {}, {}
    for n in names:
        if n in consts:
            continue
        if n in pointers:
            sig[n] = pointers[n]
            attrs[(names.index(n),)] = [["tt.divisibility", 16]]
        elif n == "eps":
            sig[n] = "fp32"
        elif ints[n] == 1:  # the JIT makes an integer 1 a constant
            consts[n] = 1
        else:
            sig[n] = "i32"
            if _specialized(ints[n]):
                attrs[(names.index(n),)] = [["tt.divisibility", 16]]
    for n in consts:
        sig[n] = "constexpr"
    src = ASTSource(KERNEL, sig, constexprs={(names.index(n),): v for n, v in consts.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return kernel, (grid, consts, options)


# -- control flow ------------------------------------------------------------------------------

class Listing:
    """Instructions of one function in order: text, source chain (outermost last), branch target
    label or None, whether it ends the program (exit), falls through, or is conditional."""

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

    def successors(self, i):
        out = []
        if self.exits[i] and not self.conditional[i]:
            return out
        if self.targets[i] is not None:
            out.append(self.labels[self.targets[i]])
            if self.conditional[i]:
                out.append(i + 1)
        else:
            out.append(i + 1)
        return [j for j in out if j < len(self.ops)]

    def distances_to_exit(self):
        """Fewest instructions from each instruction to the end of the program (itself included)."""
        preds = [[] for _ in self.ops]
        for i in range(len(self.ops)):
            for j in self.successors(i):
                preds[j].append(i)
        dist = [None] * len(self.ops)
        queue = deque()
        for i, e in enumerate(self.exits):
            if e and not self.conditional[i]:
                dist[i] = 1
                queue.append(i)
        while queue:
            j = queue.popleft()
            for i in preds[j]:
                if dist[i] is None:
                    dist[i] = dist[j] + 1
                    queue.append(i)
        return dist

    def reach(self, start):
        seen, stack = set(), [start]
        while stack:
            i = stack.pop()
            if i in seen or i >= len(self.ops):
                continue
            seen.add(i)
            stack.extend(self.successors(i))
        return seen

    def distances_from_entry(self):
        dist = [None] * len(self.ops)
        dist[0] = 1
        queue = deque([0])
        while queue:
            i = queue.popleft()
            for j in self.successors(i):
                if dist[j] is None:
                    dist[j] = dist[i] + 1
                    queue.append(j)
        return dist

    def path(self, start):
        """The instructions of a shortest path from `start` to an exit."""
        to_exit = self.distances_to_exit()
        out, i = [], start
        while True:
            out.append(i)
            if self.exits[i] and not self.conditional[i]:
                return out
            i = min(self.successors(i), key=lambda j: to_exit[j] if to_exit[j] is not None else 1 << 30)


def parse_sass(text: str) -> Listing:
    """nvdisasm -g -gi output of the kernel's own section (subroutines after its last EXIT are
    reached only by CALL and not followed)."""
    lst = Listing()
    chain, fresh = [], True
    in_kernel = False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("//----") and ".text." in s:
            in_kernel = s.split(".text.")[1].split()[0] == KERNEL.__name__
            continue
        if not in_kernel:
            continue
        m = re.match(r'//## File "(.+?)", line (\d+)(?: inlined at "(.+?)", line (\d+))?', s)
        if m:
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
        tgt = re.search(r"`\((\S+?)\)", body)
        if name.startswith("BRA"):
            lst.add(name, tuple(chain), tgt.group(1), conditional=pred)
        elif name.startswith("EXIT"):
            lst.add(name, tuple(chain), conditional=pred, exit_=True)
        elif name.startswith("RET"):
            lst.add(name, tuple(chain), conditional=pred, exit_=True)
        else:
            lst.add(name, tuple(chain))
    return lst


def parse_ptx(text: str, files: dict[int, str]) -> Listing:
    lst = Listing()
    chain = ()
    body = text.split(f".entry {KERNEL.__name__}", 1)[1]
    body = body[body.index("{"):]
    for line in body.splitlines():
        s = line.split("//")[0].strip()
        if not s:
            continue
        if s.startswith(".loc"):
            m = re.match(r"\.loc\s+(\d+)\s+(\d+)\s+\d+(?:,.*inlined_at\s+(\d+)\s+(\d+))?", s)
            if m:
                inner = (files.get(int(m.group(1))), int(m.group(2)))
                chain = (inner, (files.get(int(m.group(3))), int(m.group(4)))) if m.group(3) else (inner,)
            continue
        if s.startswith(".file") or s == "}" and lst.ops and lst.exits[-1] and not lst.conditional[-1]:
            if s.startswith(".file"):
                continue
        if re.match(r"^\$\S+:$", s):
            lst.labels[s[:-1]] = len(lst.ops)
            continue
        if s.startswith((".", "{", "}", "(", ")")) or not s.endswith(";"):
            continue
        pred = s.startswith("@")
        op = s.split(None, 1)[1] if pred else s
        name = op.split()[0].rstrip(";")
        if name.startswith("bra"):
            lst.add(name, chain, op.split()[1].rstrip(";"), conditional=pred)
        elif name == "ret":
            lst.add(name, chain, conditional=pred, exit_=True)
        else:
            lst.add(name, chain)
    return lst


def _call_lines(kernel_fn, callee: str) -> set[int]:
    """Source lines (absolute) of the calls to `callee` in the kernel's body."""
    src, first = inspect.getsourcelines(kernel_fn)
    tree = ast.parse("".join(src).replace("\n", "\n", 0).lstrip())
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == callee:
            lines.update(range(first + node.lineno - 1, first + node.end_lineno))
    return lines


def sides(lst: Listing, q_lines: set[int], kv_lines: set[int], rope_file: str):
    """{"q": path, "kv": path}: each a shortest path from the entry through that side of the
    kernel's branch to an exit; one path "q" when there is no such branch."""
    from_entry = lst.distances_from_entry()
    best, best_score = None, 0
    for i in range(len(lst.ops)):
        if not (lst.targets[i] and lst.conditional[i]) or from_entry[i] is None:
            continue
        a, b = lst.reach(i + 1), lst.reach(lst.labels[lst.targets[i]])
        score = min(len(a - b), len(b - a))
        if score > best_score:
            best, best_score = (i, a - b, b - a), score
    if best is None or best_score < 16:
        return {"q": lst.path(0)}
    i, only_a, only_b = best

    def votes(region, lines):  # by the outermost source line: the kernel's own
        return sum(1 for k in region if lst.chains[k] and lst.chains[k][-1][1] in lines)

    prefix = _prefix_path(lst, i)
    fall, taken = prefix + lst.path(i + 1), prefix + lst.path(lst.labels[lst.targets[i]])
    if votes(only_a, q_lines) - votes(only_a, kv_lines) >= votes(only_b, q_lines) - votes(only_b, kv_lines):
        return {"q": fall, "kv": taken}
    return {"q": taken, "kv": fall}


def _prefix_path(lst: Listing, target: int):
    """A shortest path from the entry to instruction `target`, target included."""
    parent = {0: None}
    queue = deque([0])
    while queue:
        i = queue.popleft()
        if i == target:
            break
        for j in lst.successors(i):
            if j not in parent:
                parent[j] = i
                queue.append(j)
    out, i = [], target
    while i is not None:
        out.append(i)
        i = parent[i]
    return out[::-1]


# -- attribution -------------------------------------------------------------------------------

def _function_ranges():
    """(file, first line, last line, name) of the functions in rope.py and common.py."""
    out = []
    for mod in (rope, common):
        path = inspect.getsourcefile(mod)
        tree = ast.parse(Path(path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                out.append((path, node.lineno, node.end_lineno, node.name))
    return out


def innermost_function(chain, ranges):
    if not chain:
        return "?"
    f, ln = chain[0]
    # the nearest function starting at or above the line: the inlined libdevice code of tl.cos
    # and tl.sin is given lines just past the function that calls them
    starts = [(a, name) for path, a, b, name in ranges if path == f and a <= ln]
    return max(starts)[1] if starts else (Path(f).name if f else "?")


# -- report ------------------------------------------------------------------------------------

def measure(T, hq, hkv, d, dtype="bf16", v_is_k=False, breakdown=False):
    kernel, (grid, consts, options) = compile_shape(T, hq, hkv, d, dtype, v_is_k)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        sass_text = subprocess.run([str(NVDISASM), "-g", "-gi", "-c", str(cubin)], capture_output=True,
                                   text=True, check=True).stdout
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    ptx_text = kernel.asm["ptx"]
    files = {int(m.group(1)): m.group(2) for m in re.finditer(r'\.file\s+(\d+)\s+"(.+?)"', ptx_text)}
    rope_file = inspect.getsourcefile(rope)
    q_lines, kv_lines = _call_lines(KERNEL.fn, "_q_heads"), _call_lines(KERNEL.fn, "_kv_heads")
    sass, ptx = parse_sass(sass_text), parse_ptx(ptx_text, files)
    sass_paths, ptx_paths = sides(sass, q_lines, kv_lines, rope_file), sides(ptx, q_lines, kv_lines, rope_file)
    threads = options["num_warps"] * 32
    tokens = consts["TOKENS"]
    programs, kv_tokens = programs_of(T, hkv, grid, consts)
    elems = {"q": tokens * min(consts["Q_HEADS"], hq) * d, "kv": 2 * kv_tokens * min(consts["KV_HEADS"], hkv) * d}
    row = dict(T=T, d=d, hq=hq, hkv=hkv, dtype=dtype, grid=grid, tokens=tokens, kv_tokens=kv_tokens,
               q_heads=consts["Q_HEADS"], kv_heads=consts["KV_HEADS"], warps=options["num_warps"], regs=regs,
               local=local, smem=kernel.metadata.shared, sides={})
    launch = {"ptx": 0, "sass": 0}
    written = T * hq * d + (2 * T * hkv * d)
    for side in ("q", "kv"):
        if side not in sass_paths or not programs[side]:
            continue
        n_ptx, n_sass = len(ptx_paths[side]), len(sass_paths[side])
        row["sides"][side] = dict(ptx=n_ptx, sass=n_sass, elems=elems[side],
                                  ptx_per_elem=n_ptx * threads / elems[side],
                                  sass_per_elem=n_sass * threads / elems[side])
        launch["ptx"] += programs[side] * n_ptx * threads
        launch["sass"] += programs[side] * n_sass * threads
        if breakdown:
            ranges = _function_ranges()
            row["sides"][side]["by_function"] = Counter(innermost_function(sass.chains[i], ranges)
                                                        for i in sass_paths[side])
            row["sides"][side]["by_op"] = Counter(sass.ops[i].split(".")[0] for i in sass_paths[side])
    row["launch_ptx_per_elem"] = launch["ptx"] / written
    row["launch_sass_per_elem"] = launch["sass"] / written
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64, 8192])
    p.add_argument("--d", nargs="+", type=int, default=[256, 512])
    p.add_argument("--hq", type=int, default=8)
    p.add_argument("--hkv", nargs="+", type=int, default=[1, 0], help="0: the q-only launch of KV-shared layers")
    p.add_argument("--dtype", default="bf16", choices=sorted(TL_TYPE))
    p.add_argument("--v-is-k", action="store_true")
    p.add_argument("--breakdown", action="store_true", help="SASS of each path by innermost function and opcode")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=INT",
                   help="launch settings of rope.py to try instead of its own, e.g. QKV_WARP_ELEMS=1024")
    p.add_argument("--module", help="measure this copy of rope.py instead (e.g. the one before a change)")
    args = p.parse_args(argv)
    if args.module:
        use_module(args.module)
    for setting in args.set:
        name, value = setting.split("=")
        if not hasattr(rope, name):
            raise SystemExit(f"rope.py has no setting {name}")
        setattr(rope, name, int(value))
    print(f"{'T':>5} {'D':>4} {'Hkv':>3} {'programs':>8} {'tok':>3} {'qh':>2} {'kvtok':>5} {'kvh':>3} {'warps':>5} "
          f"{'regs':>4} "
          f"{'q ptx/thr':>9} {'q sass/thr':>10} {'q ptx/el':>8} {'q sass/el':>9} "
          f"{'kv ptx/thr':>10} {'kv sass/thr':>11} {'kv ptx/el':>9} {'kv sass/el':>10} "
          f"{'launch ptx/el':>13} {'launch sass/el':>14}")
    for T in args.tokens:
        for d in args.d:
            for hkv in args.hkv:
                r = measure(T, args.hq, hkv, d, args.dtype, args.v_is_k, args.breakdown)
                q, kv = r["sides"].get("q", {}), r["sides"].get("kv", {})
                f = lambda s, k, fmt: format(s[k], fmt) if k in s else "-"  # noqa: E731
                print(f"{T:>5} {d:>4} {hkv:>3} {math.prod(r['grid']):>8} {r['tokens']:>3} {r['q_heads']:>2} "
                      f"{r['kv_tokens']:>5} {r['kv_heads']:>3} {r['warps']:>5} {r['regs']:>4} "
                      f"{f(q, 'ptx', '9d')} {f(q, 'sass', '10d')} {f(q, 'ptx_per_elem', '8.1f')} "
                      f"{f(q, 'sass_per_elem', '9.1f')} {f(kv, 'ptx', '10d'):>10} {f(kv, 'sass', '11d'):>11} "
                      f"{f(kv, 'ptx_per_elem', '9.1f'):>9} {f(kv, 'sass_per_elem', '10.1f'):>10} "
                      f"{r['launch_ptx_per_elem']:>13.1f} {r['launch_sass_per_elem']:>14.1f}", flush=True)
                if args.breakdown:
                    for side, s in r["sides"].items():
                        print(f"      {side} by function: {dict(s['by_function'].most_common())}")
                        print(f"      {side} by opcode:   {dict(s['by_op'].most_common(25))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
