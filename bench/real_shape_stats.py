"""Statistics of a seeded random real-shape model, and how far its bf16 reference is from the truth.

    python bench/real_shape_stats.py --preset e2b --layers 10 --vocab 65536 --tokens 256
    python bench/real_shape_stats.py --preset 31b --device cuda --tokens 512 --json out.json

Builds the reference twice on the same bf16-representable weights: in the compared dtype
(bfloat16) and as the truth (float64, or float32 where float64 would not fit), runs a forward over
seeded random token ids, and reports:

  - per layer: residual RMS of the stream leaving the layer (truth), the bf16 stream's relative L2
    error against the truth, attention entropy (mean over heads and queries, nats, and the mean
    largest probability), the share of (query, head) whose most-attended key differs between bf16
    and truth, and for MoE layers the router's logit std and the share of tokens whose top-k expert
    set differs;
  - at the logits: the truth's std and max, the bf16 argmax agreement with the truth, the relative
    L2 error, and the distribution metrics of oracle/distribution.py (KL, top-k overlap, logprobs);
  - MoE models: the same against the truth routed as the bf16 model routed (design note 35), the
    truth `check` judges such models against, with the stream's error by layer.

`--init unit|checkpoint` picks the random init style (reference/weights.py; default: the
preset's). `--layers N` and `--vocab V` (and `--experts E`) build a reduced copy of the real shape
for machines where the full one does not fit (the last N layers of the preset's layer pattern; KV
sharing scaled to the same share). Everything else (widths, heads, head sizes, windows) is the
preset's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oracle.distribution import distribution_metrics  # noqa: E402
from reference import Gemma4Reference  # noqa: E402
from reference.config import ConfigError, Gemma4Config  # noqa: E402
from reference.model import attention_mask, compute_dtype, moe_router_input  # noqa: E402
from reference.presets import get_preset  # noqa: E402
from reference.weights import default_init, parameter_count, random_weights  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def reduced(cfg: Gemma4Config, layers: int | None, vocab: int | None, experts: int | None) -> Gemma4Config:
    """A copy of `cfg` with fewer layers / a smaller vocabulary / fewer experts."""
    changes = {}
    if layers is not None and layers < cfg.num_hidden_layers:
        changes["num_hidden_layers"] = layers
        changes["layer_types"] = tuple(cfg.layer_types[-layers:])
    if vocab is not None and vocab < cfg.vocab_size:
        changes["vocab_size"] = vocab
        if cfg.vocab_size_per_layer_input:
            changes["vocab_size_per_layer_input"] = min(vocab, cfg.vocab_size_per_layer_input)
        changes["eos_token_id"] = tuple(t for t in (cfg.eos_token_id or ()) if t < vocab) or (1,)
    if experts is not None and cfg.enable_moe_block and experts < cfg.num_experts:
        changes["num_experts"] = experts
        changes["top_k_experts"] = min(cfg.top_k_experts, experts)
    if not changes:
        return cfg
    if "num_hidden_layers" in changes and cfg.num_kv_shared_layers:
        want = round(cfg.num_kv_shared_layers * layers / cfg.num_hidden_layers)
        for shared in range(want, -1, -1):  # the largest share that leaves a producer of each type
            try:
                return dataclasses.replace(cfg, **changes, num_kv_shared_layers=shared)
            except ConfigError:
                continue
    return dataclasses.replace(cfg, **changes)


def estimate_gb(cfg: Gemma4Config, truth_dtype: torch.dtype, tokens: int) -> float:
    n = parameter_count(cfg)
    per_param = 2 + torch.empty((), dtype=truth_dtype).element_size()
    logits = tokens * cfg.vocab_size * (2 + 8 + 8) * 2  # both logits, float64 log-softmax copies
    return (n * per_param + 4 * max_tensor(cfg) + logits) / 2 ** 30


def max_tensor(cfg: Gemma4Config) -> int:
    from reference.weights import expected_shapes
    return max(math.prod(s) for s in expected_shapes(cfg).values())


def attention_stats(q: torch.Tensor, k: torch.Tensor, qt: torch.Tensor, kt: torch.Tensor, window) -> dict:
    """q/k [T, heads, D] of the compared dtype, qt/kt of the truth. Entropy and top-1 share of the
    truth's attention; share of (query, head) whose argmax key differs between the two."""
    T = q.shape[0]
    pos = torch.arange(T, device=q.device)

    def probs(q_, k_):
        dt = compute_dtype(q_.dtype)
        groups = q_.shape[1] // k_.shape[1]
        kk = k_.repeat_interleave(groups, dim=1)
        s = torch.einsum("thd,shd->hts", q_, kk).to(dt) + attention_mask(pos, window, dt)
        return torch.softmax(s, dim=-1)

    pt = probs(qt, kt)
    pc = probs(q, k)
    ent = -(torch.where(pt > 0, pt * pt.log(), torch.zeros_like(pt))).sum(-1)
    scores_std = None
    flips = (pt.argmax(-1) != pc.argmax(-1)).double().mean()
    return {"entropy": float(ent.mean()), "max_prob": float(pt.max(-1).values.mean()),
            "argmax_key_flips": float(flips), "scores_std": scores_std}


def router_stats(ref: Gemma4Reference, truth: Gemma4Reference, layer: int, x: torch.Tensor, xt: torch.Tensor) -> dict:
    """Router logits std (truth) and the share of tokens whose top-k expert set differs."""
    p = f"layers.{layer}."
    cfg = truth.config
    z = moe_router_input(xt, truth.w[p + "router.scale"], cfg.rms_norm_eps)
    logits = torch.nn.functional.linear(z, truth.w[p + "router.proj.weight"])
    _, ids_c = ref.route(x.reshape(-1, x.shape[-1]), p)
    _, ids_t = truth.route(xt.reshape(-1, xt.shape[-1]), p)
    differ = (ids_c.sort(-1).values != ids_t.sort(-1).values).any(-1).double().mean()
    probs = torch.softmax(logits, -1)
    return {"router_logit_std": float(logits.std(-1).mean()), "router_top1_prob": float(probs.max(-1).values.mean()),
            "expert_set_differs": float(differ)}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def run(args) -> dict:
    device = torch.device(args.device)
    cfg = reduced(get_preset(args.preset), args.layers, args.vocab, args.experts)
    init = args.init or default_init(cfg)
    dtype = DTYPES[args.dtype]
    truth_dtype = args.truth_dtype
    if truth_dtype == "auto":
        truth_dtype = "float64" if estimate_gb(cfg, torch.float64, args.tokens) <= args.max_gb else "float32"
    tdt = DTYPES[truth_dtype]
    gb = estimate_gb(cfg, tdt, args.tokens)
    print(f"{args.preset}: {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}, "
          f"{parameter_count(cfg) / 1e6:.0f}M params, init {init}; {args.dtype} vs {truth_dtype} truth; "
          f"estimated {gb:.1f} GB", flush=True)
    if gb > args.max_gb:
        raise SystemExit(f"estimated {gb:.1f} GB exceeds --max-gb {args.max_gb}: use --layers/--vocab")

    t0 = time.time()
    w = random_weights(cfg, args.seed, dtype, device, init=init)
    ref = Gemma4Reference(cfg, w)
    truth = Gemma4Reference(cfg, {k: v.to(tdt) for k, v in w.items()})
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.tokens,), generator=gen).to(device)
    taps_c, taps_t = {}, {}
    ref(ids, taps=taps_c)
    t1 = time.time()
    truth(ids, taps=taps_t)
    t2 = time.time()

    layers = []
    for spec in cfg.layers:
        p = f"layers.{spec.index}."
        row = {"layer": spec.index, "type": spec.type, "head_dim": spec.head_dim,
               "residual_rms": float(taps_t[p + "out"].double().pow(2).mean().sqrt()),
               "out_rel_l2": rel_l2(taps_c[p + "out"], taps_t[p + "out"])}
        window = cfg.sliding_window if spec.type == "sliding_attention" else None
        row.update(attention_stats(taps_c[p + "q"], taps_c[p + "k"], taps_t[p + "q"], taps_t[p + "k"], window))
        if cfg.enable_moe_block:
            row.update(router_stats(ref, truth, spec.index, taps_c[p + "attn_out"], taps_t[p + "attn_out"]))
        layers.append(row)

    lc, lt = taps_c["logits"], taps_t["logits"]
    dist = distribution_metrics(lt, lc, args.k)
    logits = {"truth_std": float(lt.double().std(-1).mean()), "truth_max": float(lt.double().max()),
              "truth_mean_top1_gap": float((lambda v: (v[:, 0] - v[:, 1]).mean())(lt.double().topk(2, -1).values)),
              "rel_l2": rel_l2(lc, lt), "argmax_agreement_strict": float((lc.argmax(-1) == lt.argmax(-1)).double().mean()),
              **dist.to_dict()}
    routed = None
    if cfg.enable_moe_block:  # the truth routed as the compared dtype routed (design note 35)
        forced = {spec.index: taps_c[f"layers.{spec.index}.experts"] for spec in cfg.layers}
        taps_r = {}
        truth(ids, taps=taps_r, forced_experts=forced)
        lr = taps_r["logits"]
        routed = {"out_rel_l2": [rel_l2(taps_c[f"layers.{s.index}.out"], taps_r[f"layers.{s.index}.out"])
                                 for s in cfg.layers],
                  "rel_l2": rel_l2(lc, lr), "argmax_agreement_strict": float((lc.argmax(-1) == lr.argmax(-1)).double().mean()),
                  **distribution_metrics(lr, lc, args.k).to_dict()}
    return {"preset": args.preset, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size,
            "num_kv_shared_layers": cfg.num_kv_shared_layers,
            "experts": cfg.num_experts if cfg.enable_moe_block else None, "init": init, "tokens": args.tokens,
            "dtype": args.dtype, "truth_dtype": truth_dtype, "device": str(device), "seed": args.seed,
            "seconds": {"compared": round(t1 - t0, 1), "truth": round(t2 - t1, 1), "stats": round(time.time() - t2, 1)},
            "embed_rms": float(taps_t["embed"].double().pow(2).mean().sqrt()),
            "per_layer": layers, "logits": logits, "routed_truth": routed}


def print_report(r: dict) -> None:
    moe = r["experts"] is not None
    head = f"{'layer':>5} {'type':>7} {'resid RMS':>9} {'out relL2':>9} {'attn H':>7} {'max p':>6} {'key flip':>8}"
    if moe:
        head += f" {'rtr std':>7} {'rtr p1':>6} {'exp diff':>8}"
    print(head)
    for x in r["per_layer"]:
        line = (f"{x['layer']:>5} {x['type'][:7]:>7} {x['residual_rms']:>9.3g} {x['out_rel_l2']:>9.3g} "
                f"{x['entropy']:>7.3f} {x['max_prob']:>6.3f} {x['argmax_key_flips']:>8.3f}")
        if moe:
            line += f" {x['router_logit_std']:>7.3f} {x['router_top1_prob']:>6.3f} {x['expert_set_differs']:>8.3f}"
        print(line)
    g = r["logits"]
    print(f"logits: truth std {g['truth_std']:.3g}, max {g['truth_max']:.3g}, mean top-1 gap {g['truth_mean_top1_gap']:.3g}; "
          f"{r['dtype']} vs truth: rel L2 {g['rel_l2']:.3g}, argmax agreement {g['argmax_agreement']:.3f} "
          f"(strict {g['argmax_agreement_strict']:.3f}), KL mean {g['kl_mean']:.3g} max {g['kl_max']:.3g}, "
          f"top-{g['k']} overlap {g['topk_overlap']:.3f}, top-{g['k']} logprob max diff {g['topk_logprob_max_abs']:.3g}")
    if r.get("routed_truth"):
        g = r["routed_truth"]
        print(f"against the truth routed as {r['dtype']} routed: stream rel L2 by layer "
              f"{' '.join(f'{x:.3g}' for x in g['out_rel_l2'])}; logits rel L2 {g['rel_l2']:.3g}, argmax agreement "
              f"{g['argmax_agreement']:.3f} (strict {g['argmax_agreement_strict']:.3f}), KL mean {g['kl_mean']:.3g} "
              f"max {g['kl_max']:.3g}, top-{g['k']} overlap {g['topk_overlap']:.3f}")
    print(f"embed RMS {r['embed_rms']:.3g}; seconds {r['seconds']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="e2b")
    ap.add_argument("--layers", type=int, default=None, help="reduced copy: the last N layers of the pattern")
    ap.add_argument("--vocab", type=int, default=None, help="reduced copy: a smaller vocabulary")
    ap.add_argument("--experts", type=int, default=None, help="reduced copy: fewer experts (MoE)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--init", choices=["unit", "checkpoint"], default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--truth-dtype", default="auto", choices=["auto", "float64", "float32"])
    ap.add_argument("--max-gb", type=float, default=12.0, help="memory the run may use (weights, logits)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    r = run(args)
    print_report(r)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
