"""What taps cost the optimized path when no capture is asked for, and when one is.

With `taps=None` every tap site is a call of a no-op function (no clone, no sync, no branch
inside a kernel). This measures, on the current device: the forward time without capture; the
number of tap sites a forward passes; the cost of one no-op tap call; hence the share of the
forward spent on disabled taps; and the forward time with a capture collecting every tap.

    python bench/tap_overhead.py [--model tiny] [--tokens 64] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optimized.kernels import default_device  # noqa: E402  (decides the interpreter first)

import torch  # noqa: E402

import optimized.model as paged  # noqa: E402
from optimized.runner import Runner  # noqa: E402


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    dev = default_device()
    runner = Runner(args.model, dtype=dtype, device=dev, page_size=16, chunk_size=args.tokens)
    prompt = torch.randint(0, runner.config.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()

    calls = 0
    real_no_emit = paged._no_emit

    def counting(name, t):
        nonlocal calls
        calls += 1

    run_plain = lambda: runner.run([prompt])  # noqa: E731  (one prefill forward)
    run_plain()  # warm up (kernel compilation)
    plain = timed(run_plain, args.repeats)

    paged._no_emit = counting  # count the tap sites a forward passes
    try:
        runner.run([prompt])
    finally:
        paged._no_emit = real_no_emit
    per_call = min(timeit.repeat(lambda: real_no_emit("layers.0.q", None), number=100_000, repeat=5)) / 100_000

    sink = lambda rid, name, pos, t: None  # noqa: E731  (capture on: clones made, then dropped)
    captured = timed(lambda: runner.run([prompt], taps=sink), args.repeats)

    print(f"device {dev}, model {args.model}, {args.tokens} tokens, {args.dtype}, median of {args.repeats}")
    print(f"forward, capture off:            {plain * 1e3:9.3f} ms")
    print(f"tap sites passed per forward:    {calls}")
    print(f"one disabled tap call:           {per_call * 1e9:9.1f} ns")
    print(f"disabled taps, share of forward: {calls * per_call / plain:9.2e}")
    print(f"forward, capture on (clones):    {captured * 1e3:9.3f} ms")


if __name__ == "__main__":
    main()
