"""Peak device memory of share_projection_storage (optimized/model.py) on a real shape: stacking
in place, where the dict holds the only reference to each part, against the same call while a
second reference keeps every part alive (what a copy of the dict did before session 13).

    python bench/share_memory.py --model e2b          # a GPU: torch.cuda's peak allocation
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from optimized.model import share_projection_storage  # noqa: E402
from reference.weights import resolve  # noqa: E402


def peak_gb(model: str, device: torch.device, keep_parts: bool) -> tuple[float, float]:
    """(GB the weights take, GB more at the peak of stacking them)."""
    torch.cuda.empty_cache()
    config, w = resolve(model, torch.bfloat16, device, 0)
    held = dict(w) if keep_parts else None  # a second reference to every part
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    share_projection_storage(config, w)
    extra = torch.cuda.max_memory_allocated(device) - base
    del held, w
    return base / 1e9, extra / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="e2b")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("share_memory: needs a CUDA device (it reads torch.cuda's allocator statistics)")
        return 2
    device = torch.device("cuda")
    for keep in (False, True):
        model_gb, extra_gb = peak_gb(args.model, device, keep)
        print(f"{args.model} bf16, weights {model_gb:.2f} GB; stacking {'with every part held elsewhere' if keep else 'in place'}: "
              f"peak {extra_gb:.2f} GB above them", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
