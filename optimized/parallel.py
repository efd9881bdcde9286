"""Tensor parallelism on torch.distributed: which rank holds which slice of the model, and the
few collectives the sharded forward needs (docs/design_notes.md, "Tensor parallelism").

Every rank runs the same engine loop on the same requests (scheduling is deterministic host
logic, so all ranks build the same batches), holding only its shard:

- Attention: the query heads split evenly, rank r holding heads [r * Hq/w, (r + 1) * Hq/w).
  q/k/v are column-parallel (rows of the projections), q_norm/k_norm are per head and so
  replicated, o_proj is row-parallel (its columns of those heads) and its partial sums meet in
  one all-reduce. KV heads split the same way while there are at least as many as ranks; with
  fewer, each rank keeps the one KV head its query heads read (`kv_heads`), replicated on
  w / Hkv ranks, which is how serving engines run one or two KV heads on more devices. A K=V
  layer's V is its K shard, a KV-shared layer reads its source's shard of the same heads, and
  each layer type keeps its own head size and KV head count.
- Dense MLP: gate and up column-parallel, down row-parallel, one all-reduce.
- MoE experts: every rank holds every expert with its slice of the expert intermediate size
  (intermediate-sharded, not expert-sharded): the router is replicated and computes the same
  routing on every rank, so no token moves between ranks, each rank's work is the same however
  the router skews, and the expert kernels run unchanged on a narrower matrix. The dense and
  the expert partial sums share one all-reduce.
- Replicated: the embeddings (and so the tied lm_head and the final softcap), the per-layer
  embedding (PLE) block, every norm, the router, layer scalars.

A rank's model is the unsharded forward on a `shard_config` (the local head counts and widths),
so the paged model only calls `all_reduce` at the two places per layer the math needs it; the
KV pools are sized by the same config, holding the local KV heads only.

`shard_part` states the rules tensor by tensor (which part of a whole weight a rank holds);
`shard_weights` cuts in-memory tensors by it and `load_shard` reads only those parts of a
checkpoint, so a rank never holds a whole sharded tensor (`load_shard` says what a rank holds
for each kind of source).

Under the oracle, `gathering_sink` turns the sharded taps back into the canonical layout (heads
concatenated in head order, replicated KV heads once, gate|up as [all gate; all up]) on every
rank, so a capture of a sharded run compares with the unsharded reference unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from reference.config import ConfigError, Gemma4Config
from reference.weights import Part, resolve_config
from reference.weights import resolve as resolve_weights

from .model import TapSink, share_projection_storage

# Taps whose tensors a rank holds a slice of; every other tap is replicated (identical on all ranks).
HEAD_TAPS = ("q", "o")
KV_TAPS = ("k", "v", "k_cache", "v_cache")
WIDTH_TAPS = ("mlp_act",)
GATE_UP_TAPS = ("mlp_gate_up",)


class TensorParallelError(ValueError):
    """Tensor parallelism asked for in a way that cannot run (no launcher, a world size that does
    not match the processes started, a device the backend cannot use)."""


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group, and the collectives the model uses."""

    rank: int
    world: int
    device: torch.device
    group: Any = None  # a torch.distributed process group; None: the default one

    @property
    def backend(self) -> str:
        return dist.get_backend(self.group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; returns x. Called even at world size 1, so a one-rank
        run exercises the backend's code path."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (same shape on all ranks), in rank order."""
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x, group=self.group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` as rank `src` has it (a picklable Python object)."""
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]


def backend_for(device: torch.device) -> str:
    """The collective backend torch.distributed pairs with the device's type (NCCL for CUDA,
    XCCL for XPU, gloo for the CPU): by capability, from torch's own table, not by vendor here."""
    return dist.Backend.default_device_backend_map.get(torch.device(device).type, "gloo")


def launched_world() -> int | None:
    """The world size a launcher (torchrun) set in the environment, or None."""
    world = os.environ.get("WORLD_SIZE")
    return int(world) if world else None


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def setup(world: int, device=None, *, init_method: str | None = None, rank: int | None = None,
          timeout: timedelta | None = None) -> TensorParallel:
    """Join the default process group (starting it if needed) as one of `world` ranks.

    Under torchrun the environment says where to meet; tests pass `init_method` (a file:// or
    tcp:// rendezvous) and `rank`. A world of 1 needs no launcher: it meets itself on a free
    local port. The backend is backend_for(device); on an accelerator the rank's device is
    index LOCAL_RANK of its type (unless an index is given). `timeout`: how long a collective
    waits for the other ranks (torch's default otherwise; tests shorten it, so a rank that
    never arrives fails the run instead of hanging it)."""
    from .kernels import default_device

    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise TensorParallelError(f"tp must be an integer >= 1, got {world!r}")
    device = torch.device(device) if device is not None else default_device()
    if device.type != "cpu":
        if device.index is None:
            device = torch.device(device.type, int(os.environ.get("LOCAL_RANK", "0")))
        torch.get_device_module(device).set_device(device)
    if not dist.is_initialized():
        if init_method is None and launched_world() is None:
            if world != 1:
                raise TensorParallelError(f"tp={world} needs {world} processes: launch with "
                                          f"`torchrun --nproc-per-node {world} ...`")
            init_method, rank = f"tcp://127.0.0.1:{_free_port()}", 0
        kwargs = {} if init_method is None else {"init_method": init_method, "rank": rank, "world_size": world}
        if timeout is not None:
            kwargs["timeout"] = timeout
        dist.init_process_group(backend_for(device), **kwargs)
    if dist.get_world_size() != world:
        raise TensorParallelError(f"tp={world}, but {dist.get_world_size()} processes were launched "
                                  f"(torchrun --nproc-per-node must equal the tp size)")
    if backend_for(device) != "gloo" and dist.get_backend() != backend_for(device):
        raise TensorParallelError(f"device {device} needs the {backend_for(device)} backend; the process "
                                  f"group runs {dist.get_backend()}")
    return TensorParallel(dist.get_rank(), world, device)


def resolve(tp, device=None) -> TensorParallel | None:
    """An Engine's or Runner's `tp` argument: None (no tensor parallelism), a TensorParallel,
    or a world size to join (`setup`)."""
    if tp is None or isinstance(tp, TensorParallel):
        return tp
    return setup(tp, device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# The sharding rules
# --------------------------------------------------------------------------------------------


def check_shardable(config: Gemma4Config, world: int) -> None:
    """Raise ConfigError naming the field when `world` ranks cannot split this model evenly."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ConfigError(f"tensor parallel size must be an integer >= 1, got {world!r}")
    Hq = config.num_attention_heads
    if Hq % world:
        raise ConfigError(f"num_attention_heads: {Hq} query heads do not split evenly across {world} ranks "
                          f"(the tp size must divide {Hq})")
    kv = [("num_key_value_heads", config.num_key_value_heads)]
    if config.attention_k_eq_v:
        kv.append(("num_global_key_value_heads", config.num_global_key_value_heads))
    for name, n in kv:
        if n % world and world % n:
            raise ConfigError(f"{name}: {n} KV heads neither split across {world} ranks nor replicate onto them "
                              f"(one of the two must divide the other)")
    widths = [("intermediate_size", config.intermediate_size)]
    if config.enable_moe_block:
        widths.append(("moe_intermediate_size", config.moe_intermediate_size))
    for name, n in widths:
        if n % world:
            raise ConfigError(f"{name}: {n} does not split evenly across {world} ranks")


def kv_heads(total: int, rank: int, world: int) -> range:
    """The KV heads rank `rank` holds: an even share while total >= world, else the one head its
    query heads read (head rank // (world / total), replicated on world / total ranks)."""
    if total >= world:
        n = total // world
        return range(rank * n, rank * n + n)
    head = rank // (world // total)
    return range(head, head + 1)


def shard_config(config: Gemma4Config, world: int) -> Gemma4Config:
    """The config of one rank's shard: local query and KV head counts, local MLP and expert
    widths. The paged model and the KV pools read their shapes from it."""
    check_shardable(config, world)
    if world == 1:
        return config

    def local_kv(n):
        return None if n is None else len(kv_heads(n, 0, world))

    changes = dict(num_attention_heads=config.num_attention_heads // world,
                   num_key_value_heads=local_kv(config.num_key_value_heads),
                   num_global_key_value_heads=local_kv(config.num_global_key_value_heads),
                   intermediate_size=config.intermediate_size // world)
    if config.enable_moe_block:
        changes["moe_intermediate_size"] = config.moe_intermediate_size // world
    return dataclasses.replace(config, **changes)


def shard_part(config: Gemma4Config, name: str, rank: int, world: int) -> Part | None:
    """The part of the whole tensor `name` that rank `rank` of `world` holds, or None where the
    rank holds it whole (replicated, or nothing to cut at world size 1).

    The one statement of the sharding rules: `shard_weights` cuts tensors in memory by it, and
    `load_shard` reads a checkpoint's slices and keeps a random draw's by it, so every path
    gives a rank the same elements (and a fault patched in here reaches them all). Assumes
    check_shardable(config, world) passed."""
    if world == 1 or not name.startswith("layers."):
        return None
    _, layer, rest = name.split(".", 2)
    spec = config.layers[int(layer)]
    q = _head_span(_even(config.num_attention_heads, rank, world), spec.head_dim)
    width = _even(spec.mlp_width, rank, world)
    if rest == "self_attn.q_proj.weight":
        return Part(0, (q,))
    if rest == "self_attn.o_proj.weight":
        return Part(1, (q,))
    if rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        return Part(0, (_head_span(kv_heads(spec.num_kv_heads, rank, world), spec.head_dim),))
    if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        return Part(0, (width,))
    if rest == "mlp.down_proj.weight":
        return Part(1, (width,))
    if rest in ("experts.gate_up_proj", "experts.down_proj"):
        Im = config.moe_intermediate_size
        inter = _even(Im, rank, world)
        if rest == "experts.down_proj":  # [E, H, Im]
            return Part(2, (inter,))
        return Part(1, (inter, range(Im + inter.start, Im + inter.stop)))  # [E, 2 Im, H]: gate rows, then up rows
    return None


def shard_weights(config: Gemma4Config, weights: dict[str, torch.Tensor], rank: int, world: int
                  ) -> dict[str, torch.Tensor]:
    """Rank `rank`'s weights, cut from whole tensors in memory by `shard_part`: the same names,
    sharded tensors copied out (so the whole ones can be freed), replicated tensors shared.
    Where nothing is cut (world size 1) it returns `weights` itself."""
    check_shardable(config, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, {world}), got {rank}")
    parts = {name: shard_part(config, name, rank, world) for name in weights}
    if all(p is None for p in parts.values()):
        return weights
    return {name: t if parts[name] is None else parts[name].take(t) for name, t in weights.items()}


@dataclass(frozen=True)
class Shard:
    """What one rank holds of a model (`load_shard`): the whole model's config, its own shard's
    config (local head counts and widths) and its shard's weights, on its device."""

    config: Gemma4Config
    shard_config: Gemma4Config
    weights: dict[str, torch.Tensor]
    rank: int = 0
    world: int = 1


def load_shard(source, dtype: torch.dtype, device, tp: TensorParallel | None, *, seed: int = 0,
               weights: dict[str, torch.Tensor] | Shard | None = None,
               check: Callable[[Gemma4Config], None] | None = None) -> Shard:
    """This rank's shard of a model, on `device` in `dtype` (the whole model without tp).

    What a rank holds, by source:
    - a checkpoint directory: only its slices. Each sharded tensor is read slice by slice from
      the memory-mapped safetensors file (`shard_part` says which), cast, and copied to the
      device; replicated tensors are read whole. Neither the host nor the device ever holds the
      whole of a sharded tensor.
    - a preset or a Gemma4Config (seeded random weights): each tensor is drawn whole on `device`
      with the unsharded draw's generator, its part kept and the rest freed before the next is
      drawn (reference.weights.random_weights), so at most one whole tensor exists beside the
      shard. Drawing on the device keeps the numbers those of the unsharded model on that device
      type (a CPU and a CUDA generator differ): every rank and the unsharded reference that
      `check --tp` judges against see one model.
    - `weights`, whole tensors in memory (tests sharing them with the reference, the oracle's
      rank 0): cut by `shard_weights` where they lie, then moved. The caller holds the whole.
    - `weights`, a Shard (the Runner's, for each run's engine): used as it is.
    A shard this function read or drew (and any shard under tp) has its q/k/v and gate/up as
    views into one stacked matrix per group (share_projection_storage), so the paged model's
    fused projections copy nothing: the device holds each weight once. Without it a 31B engine
    held 62 GB of weights plus 50 GB of stacked copies, and a second engine beside it (a bench's)
    ran an H200 out of memory. Whole `weights` the caller holds are stacked by copying either
    way; a caller building several engines from one dict passes it through
    share_projection_storage once. `check(config)` runs before any weight is read."""
    rank, world = (0, 1) if tp is None else (tp.rank, tp.world)
    if isinstance(weights, Shard):
        if (weights.rank, weights.world) != (rank, world):
            raise ValueError(f"a shard of rank {weights.rank} of {weights.world} given to rank {rank} of {world}")
        if check is not None:
            check(weights.config)
        moved = {k: v.to(device=device, dtype=dtype) for k, v in weights.weights.items()}
        return dataclasses.replace(weights, weights=moved)
    config = source if weights is not None else resolve_config(source)
    if check is not None:
        check(config)
    local = shard_config(config, world)  # refuses a world that does not split the model
    if weights is not None:
        cut = shard_weights(config, weights, rank, world)
        w = {k: v.to(device=device, dtype=dtype) for k, v in cut.items()}
    else:
        _, w = resolve_weights(source, dtype, device, seed,
                               part=lambda cfg: lambda name, _shape: shard_part(cfg, name, rank, world))
    if weights is None or world > 1:
        w = share_projection_storage(local, w)
    return Shard(config, local, w, rank, world)


def _head_span(heads: range, head_dim: int) -> range:
    return range(heads.start * head_dim, heads.stop * head_dim)


def _even(n: int, rank: int, world: int) -> range:
    return range(rank * n // world, (rank + 1) * n // world)


# --------------------------------------------------------------------------------------------
# Taps in the canonical layout
# --------------------------------------------------------------------------------------------


def canonical_tap(config: Gemma4Config, name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """One tap in the unsharded layout from every rank's slice of it (rank order). `config` is
    the unsharded model's; replicated taps come back as rank 0's."""
    if not is_sharded_tap(name):
        return shards[0]
    kind = name.rsplit(".", 1)[-1]
    if kind in HEAD_TAPS or kind in WIDTH_TAPS:
        return torch.cat(shards, dim=1)
    if kind in GATE_UP_TAPS:
        halves = [s.chunk(2, dim=1) for s in shards]
        return torch.cat([g for g, _ in halves] + [u for _, u in halves], dim=1)
    total, world = config.layers[int(name.split(".")[1])].num_kv_heads, len(shards)
    replicas = max(1, world // total)  # a replicated head is taken from the first rank holding it
    return torch.cat(shards[::replicas], dim=1)


def is_sharded_tap(name: str) -> bool:
    return name.startswith("layers.") and name.rsplit(".", 1)[-1] in HEAD_TAPS + KV_TAPS + WIDTH_TAPS + GATE_UP_TAPS


def gathering_sink(sink: TapSink, config: Gemma4Config, tp: TensorParallel) -> TapSink:
    """A tap sink for a sharded model that hands `sink` every tap in the canonical layout.

    Sharded taps are all-gathered (a collective: every rank emits the same taps in the same
    order, since every rank runs the same steps), so every rank's `sink` sees the whole tensor;
    replicated taps pass through as they are. Which rank keeps or prints them is the caller's."""
    def gathered(rid, name, positions, tensor):
        if is_sharded_tap(name):
            tensor = canonical_tap(config, name, tp.all_gather(tensor))
        sink(rid, name, positions, tensor)

    return gathered
