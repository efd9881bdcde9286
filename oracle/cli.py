"""`gemma4-testbed`: the command line. Exit codes: 0 parity / success, 1 divergence found,
2 bad input or usage."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

EXIT_OK, EXIT_DIVERGED, EXIT_BAD_INPUT = 0, 1, 2


def _version() -> str:
    try:
        return version("gemma4-testbed")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def cmd_info(args) -> int:
    import torch

    from optimized.memory import plan_kv_bytes
    from reference import CheckpointError, ConfigError, PRESETS, load_config
    from reference.weights import expected_shapes, parameter_bytes

    try:
        cfg = PRESETS[args.model] if args.model in PRESETS else load_config(args.model)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    n_params = sum(1 for _ in expected_shapes(cfg))
    print(f"model {args.model}")
    fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
              "attention_k_eq_v", "sliding_window", "num_kv_shared_layers", "use_double_wide_mlp",
              "hidden_size_per_layer_input", "enable_moe_block", "num_experts", "top_k_experts",
              "moe_intermediate_size", "final_logit_softcapping"]
    for f in fields:
        print(f"  {f:28s} {getattr(cfg, f)}")
    print("layers (index type head_dim kv_heads kv_source mlp_width):")
    for s in cfg.layers:
        shared = f"<- {s.kv_source}" if s.kv_shared else ""
        print(f"  {s.index:3d} {'sliding' if s.is_sliding else 'full   '} {s.head_dim:4d} {s.num_kv_heads:3d} "
              f"{shared:6s} {s.mlp_width}{'' if s.has_v_proj or s.kv_shared else '  (K=V)'}")
    print(f"weights: {n_params} tensors, {parameter_bytes(cfg, torch.bfloat16) // 2:,} parameters, "
          f"{_gib(parameter_bytes(cfg, torch.bfloat16))} in bf16")
    print(f"KV cache per sequence, bf16, page size {args.page_size} (paged hybrid layout vs one full-length "
          "cache per layer):")
    for ctx in args.context:
        p = plan_kv_bytes(cfg, ctx, args.page_size)
        print(f"  {ctx:>7d} tokens: {_gib(p.paged_bytes)} vs {_gib(p.naive_bytes)} ({p.saving:.2f}x smaller)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4-testbed", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a preset's or checkpoint's config and memory plan")
    info.add_argument("model", nargs="?", default="tiny", help="preset name or checkpoint directory")
    info.add_argument("--page-size", type=int, default=16)
    info.add_argument("--context", type=int, nargs="+", default=[4096, 32768, 131072])
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help/--version
        return int(e.code or 0)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
