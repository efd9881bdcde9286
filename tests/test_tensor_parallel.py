"""Tensor parallelism (optimized/parallel.py, issue 14): the sharding rules in one process, and
the sharded engine and the oracle over gloo in spawned processes at world sizes 2 and 4.

The three test architectures all have 4 query heads, 2 KV heads on sliding layers and (K=V
presets) 1 on full layers: world 2 splits the sliding KV heads and replicates the full layers'
one, world 4 replicates both. World sizes that do not divide 4 are refused (tested below).

A spawned run does all of its work in one group (starting processes costs seconds on two busy
cores) and rank 0 saves what it saw; the asserts run here, in the test process, against the
unsharded engine (world size 1) and the reference.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

import reference.weights
from oracle.cli import main
from oracle.faults import FAULTS, inject
from optimized import parallel
from optimized.engine import Engine
from optimized.runner import Runner
from reference import Gemma4Reference, resolve
from reference.config import ConfigError
from reference.presets import PRESETS
from reference.weights import expected_shapes

TEST_PRESETS = ("tiny", "tiny-kv-eq-v", "tiny-moe")
FAULT = "tp-o-proj-shard-one-head-late"

# Chunked prefill over shuffled pages of 2, then greedy decode to position 10: past every test
# preset's sliding window (4 to 6).
PROMPTS = [[(7 * i + 3) % 256 for i in range(7)], [5, 9, 200, 17, 3]]
RUN = dict(max_new_tokens=[4, 2], chunk_splits=[[4, 3], [3, 2]], return_logits=True)
ENGINE = dict(device="cpu", fused=False, page_size=2, chunk_size=4, page_order_seed=5)


# --------------------------------------------------------------------------------------------
# The sharding rules, in one process
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("preset", TEST_PRESETS)
def test_shards_have_the_shard_configs_shapes_and_reassemble_the_whole_model(preset, world):
    cfg, w = resolve(preset, torch.float32, "cpu", 0)
    shard_cfg = parallel.shard_config(cfg, world)
    shards = [parallel.shard_weights(cfg, w, r, world) for r in range(world)]
    for s in shards:
        assert {k: tuple(v.shape) for k, v in s.items()} == expected_shapes(shard_cfg)
    for spec in cfg.layers:
        a = f"layers.{spec.index}.self_attn."
        m = f"layers.{spec.index}."
        assert torch.equal(torch.cat([s[a + "q_proj.weight"] for s in shards]), w[a + "q_proj.weight"])
        assert torch.equal(torch.cat([s[a + "o_proj.weight"] for s in shards], 1), w[a + "o_proj.weight"])
        assert torch.equal(torch.cat([s[m + "mlp.down_proj.weight"] for s in shards], 1), w[m + "mlp.down_proj.weight"])
        if not spec.kv_shared:  # each KV head once, from the first rank that holds it
            step = max(1, world // spec.num_kv_heads)
            assert torch.equal(torch.cat([s[a + "k_proj.weight"] for s in shards[::step]]), w[a + "k_proj.weight"])
        if cfg.enable_moe_block:
            Im = cfg.moe_intermediate_size // world
            gate = torch.cat([s[m + "experts.gate_up_proj"][:, :Im] for s in shards], 1)
            up = torch.cat([s[m + "experts.gate_up_proj"][:, Im:] for s in shards], 1)
            assert torch.equal(torch.cat([gate, up], 1), w[m + "experts.gate_up_proj"])
            assert torch.equal(torch.cat([s[m + "experts.down_proj"] for s in shards], 2), w[m + "experts.down_proj"])
    for name in ("embed_tokens.weight", "layers.0.input_layernorm.weight", "layers.0.self_attn.q_norm.weight"):
        assert all(s[name] is w[name] for s in shards)  # replicated: shared, not copied


@pytest.mark.parametrize("Hq,Hkv,world", [(4, 2, 2), (4, 2, 4), (4, 1, 2), (4, 1, 4), (8, 2, 8), (32, 4, 8), (16, 8, 2)])
def test_each_rank_holds_the_kv_heads_its_query_heads_read(Hq, Hkv, world):
    per = Hq // world
    for r in range(world):
        read = {h // (Hq // Hkv) for h in range(r * per, (r + 1) * per)}
        assert set(parallel.kv_heads(Hkv, r, world)) == read


def test_canonical_taps_undo_the_sharding():
    cfg = PRESETS["tiny-kv-eq-v"]  # layer 3 is full: 1 KV head, replicated at world 2 and 4
    for world in (2, 4):
        n, full = 3, torch.randn(3, 4, 32)
        assert torch.equal(parallel.canonical_tap(cfg, "layers.3.q", list(full.chunk(world, 1))), full)
        kv = torch.randn(n, 1, 32)
        assert torch.equal(parallel.canonical_tap(cfg, "layers.3.k_cache", [kv] * world), kv)
        kv = torch.randn(n, 2, 16)  # layer 0 is sliding: 2 KV heads
        shards = [kv[:, list(parallel.kv_heads(2, r, world))] for r in range(world)]
        assert torch.equal(parallel.canonical_tap(cfg, "layers.0.v", shards), kv)
        gate, up = torch.randn(n, 96), torch.randn(n, 96)
        shards = [torch.cat([g, u], 1) for g, u in zip(gate.chunk(world, 1), up.chunk(world, 1))]
        assert torch.equal(parallel.canonical_tap(cfg, "layers.0.mlp_gate_up", shards), torch.cat([gate, up], 1))
        out = torch.randn(n, 64)
        assert parallel.canonical_tap(cfg, "layers.0.attn_out", [out] * world) is out


def test_world_sizes_that_do_not_split_the_model_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="num_attention_heads: 4 query heads do not split evenly across 3"):
        parallel.check_shardable(PRESETS["tiny"], 3)
    with pytest.raises(ConfigError, match="num_key_value_heads: 3 KV heads"):
        parallel.check_shardable(PRESETS["tiny"].replace(num_attention_heads=6, num_key_value_heads=3), 2)
    with pytest.raises(ConfigError, match="moe_intermediate_size: 6"):
        parallel.check_shardable(PRESETS["tiny-moe"].replace(moe_intermediate_size=6), 4)
    with pytest.raises(parallel.TensorParallelError, match="tp must be an integer >= 1"):
        parallel.setup(0)


@pytest.mark.parametrize("command", ["check", "serve"])
def test_cli_tp_refuses_without_torchrun_and_names_a_world_size_that_does_not_split(command, capsys, monkeypatch):
    if command == "serve":
        pytest.importorskip("fastapi", reason="serve needs the serve extra")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = [command, "tiny", "--device", "cpu"] + (["--port", "0"] if command == "serve" else [])
    assert main(argv + ["--tp", "2"]) == 2
    assert f"needs 2 processes; launch it as `torchrun --nproc-per-node 2 -m oracle.cli {command}" in capsys.readouterr().err
    assert main(argv + ["--tp", "3"]) == 2
    assert "--tp 3: tiny: num_attention_heads" in capsys.readouterr().err
    assert main(argv + ["--tp", "0"]) == 2


# --------------------------------------------------------------------------------------------
# A rank loads only its shard (parallel.load_shard), in one process: loading needs no group
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """Each test architecture as transformers writes it: bfloat16 (so loading casts), in several
    safetensors files under an index (so a rank's slices come from several files)."""
    pytest.importorskip("transformers")
    from tests.hf_checkpoints import hf_causal_lm

    root = tmp_path_factory.mktemp("tp-checkpoints")
    paths = {}
    for i, preset in enumerate(TEST_PRESETS):
        paths[preset] = str(root / preset)
        hf_causal_lm(PRESETS[preset], torch.bfloat16, seed=20 + i).save_pretrained(paths[preset], max_shard_size="100KB")
    return paths


def _cpu_rank(rank: int, world: int) -> parallel.TensorParallel:
    return parallel.TensorParallel(rank, world, torch.device("cpu"))


def _held_bytes(*dicts) -> int:
    """The bytes of every distinct storage the tensors in `dicts` keep alive."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for d in dicts for t in d.values()}.values())


def _shard_bytes(cfg, world: int, dtype=torch.float32) -> int:
    shapes = expected_shapes(parallel.shard_config(cfg, world))
    return sum(math.prod(s) for s in shapes.values()) * dtype.itemsize


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("source", ["checkpoint", "preset"])
@pytest.mark.parametrize("preset", TEST_PRESETS)
def test_each_rank_s_engine_holds_exactly_its_shard(checkpoints, preset, source, world):
    """A rank's engine built from a checkpoint (slices read) or a preset (drawn tensor by tensor)
    holds the very elements `shard_weights` cuts from the whole model, and each weight once:
    the weights and the fused q/k/v and gate/up stacks together take the shard's bytes, no more.
    Over the ranks a split tensor adds up to the whole; a replicated one is whole on each. World
    1 is an engine without tp: it too holds each weight once (a 31B engine once held 50 GB of
    stacked copies beside its 62 GB of weights)."""
    path = checkpoints[preset] if source == "checkpoint" else preset
    cfg, whole = resolve(path, torch.float32, "cpu", 0)
    want = expected_shapes(parallel.shard_config(cfg, world))
    held = []
    for rank in range(world):
        engine = Engine(path, device="cpu", fused=False, max_requests=1, max_context=16,
                        tp=_cpu_rank(rank, world) if world > 1 else None)
        w = engine.model.w
        assert {k: tuple(v.shape) for k, v in w.items()} == want
        cut = parallel.shard_weights(cfg, whole, rank, world)
        for name in want:
            assert torch.equal(w[name], cut[name]), f"rank {rank}: {name} differs from the in-memory cut"
        assert _held_bytes(w, engine.model.fw) == _shard_bytes(cfg, world)
        held.append({k: v.numel() for k, v in w.items()})
    for name, shape in expected_shapes(cfg).items():
        total, per_rank = math.prod(shape), [h[name] for h in held]
        if parallel.shard_part(cfg, name, 0, world) is None:
            assert per_rank == [total] * world, name
        else:
            layer = cfg.layers[int(name.split(".")[1])]
            kv = name.endswith(("k_proj.weight", "v_proj.weight"))
            replicas = max(1, world // layer.num_kv_heads) if kv else 1  # a KV head on world / Hkv ranks
            assert sum(per_rank) == total * replicas, name


@contextlib.contextmanager
def _recording_reads(monkeypatch):
    """reference.weights.safe_open, recording (checkpoint key, how, shape) for every tensor a
    read returns: `get_tensor` (whole) or an index into `get_slice` (a slice)."""
    reads, real = [], reference.weights.safe_open

    class Slice:
        def __init__(self, inner, key):
            self.inner, self.key = inner, key

        def get_shape(self):
            return self.inner.get_shape()

        def __getitem__(self, index):
            t = self.inner[index]
            reads.append((self.key, "slice", tuple(t.shape)))
            return t

    class File:
        def __init__(self, inner):
            self.inner = inner

        def keys(self):
            return self.inner.keys()

        def get_slice(self, key):
            return Slice(self.inner.get_slice(key), key)

        def get_tensor(self, key):
            t = self.inner.get_tensor(key)
            reads.append((key, "whole", tuple(t.shape)))
            return t

    @contextlib.contextmanager
    def recording_open(*args, **kwargs):
        with real(*args, **kwargs) as f:
            yield File(f)

    monkeypatch.setattr(reference.weights, "safe_open", recording_open)
    yield reads


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("preset", TEST_PRESETS)
def test_the_loader_never_reads_a_whole_sharded_tensor(checkpoints, preset, world, monkeypatch):
    """Every read of a sharded tensor returns one span of the rank's part (never the whole
    tensor, unless the part is all of it: a lone KV head replicated on every rank); replicated
    tensors are read whole, once."""
    cfg = reference.weights.load_config(checkpoints[preset])
    shapes = expected_shapes(cfg)
    for rank in range(world):
        with _recording_reads(monkeypatch) as reads:
            parallel.load_shard(checkpoints[preset], torch.float32, "cpu", _cpu_rank(rank, world))
        by_name = {}
        for key, how, shape in reads:
            by_name.setdefault(key.removeprefix("model."), []).append((how, shape))
        assert set(by_name) == set(shapes)
        for name, got in by_name.items():
            part = parallel.shard_part(cfg, name, rank, world)
            if part is None:
                assert got == [("whole", shapes[name])], name
                continue
            span_shapes = [tuple(len(r) if d == part.dim else n for d, n in enumerate(shapes[name]))
                           for r in part.spans]
            assert got == [("slice", s) for s in span_shapes], f"rank {rank}: {name} read as {got}"


def test_the_shard_fault_reaches_shards_read_from_a_checkpoint(checkpoints):
    """The fault patches the one rule (shard_part), so a rank reading its slices carries it too."""
    path = checkpoints["tiny"]
    cfg, whole = resolve(path, torch.float32, "cpu", 0)
    o, hd = whole["layers.0.self_attn.o_proj.weight"], cfg.layers[0].head_dim  # 4 query heads
    with inject(FAULT):
        first, last = (parallel.load_shard(path, torch.float32, "cpu", _cpu_rank(r, 2)).weights
                       ["layers.0.self_attn.o_proj.weight"] for r in (0, 1))
    assert torch.equal(first, o[:, :2 * hd])
    assert torch.equal(last, torch.cat([o[:, 3 * hd:], o[:, :hd]], 1))  # heads 3, 0 instead of 2, 3
    clean = parallel.load_shard(path, torch.float32, "cpu", _cpu_rank(1, 2)).weights
    assert torch.equal(clean["layers.0.self_attn.o_proj.weight"], o[:, 2 * hd:])


# --------------------------------------------------------------------------------------------
# Sharded runs over gloo
# --------------------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, rendezvous: str, out: str, presets: tuple[str, ...], oracle: bool,
               clean: bool, model: str) -> None:
    """One rank: the sharded engine on every preset (or checkpoint directory), then (with `oracle`)
    the shard fault's scenario on `model` under the oracle with the fault injected, and (with
    `clean`) without it. Rank 0 saves what it saw to `out`, with every rank's held bytes."""
    import torch.distributed as dist

    from oracle.run import run_scenario

    torch.set_num_threads(1)
    tp = parallel.setup(world, "cpu", init_method=rendezvous, rank=rank, timeout=timedelta(seconds=300))
    seen = {}
    for preset in presets:
        runner = Runner(preset, tp=tp, **ENGINE)
        results = runner.run(PROMPTS, **RUN)
        engine = runner.engine
        cfg = engine.config
        seen[preset] = {
            "tokens": [r.tokens for r in results], "logits": [r.logits for r in results],
            "pool_heads": {s.index: engine.cache.buffers(s)[0].shape[1] for s in cfg.layers},
            "q_rows": engine.model.w["layers.0.self_attn.q_proj.weight"].shape[0],
            # What the Runner and its engine keep alive, per rank: the shard, once.
            "held": _gather(_held_bytes(runner.shard.weights, engine.model.w, engine.model.fw)),
        }
    if oracle:
        fault = FAULTS[FAULT]
        faulty = run_scenario(fault.scenario(model), faults=[fault.name], tp=tp)
        held = run_scenario(fault.scenario(model), tp=tp) if clean else None
        if rank == 0:
            first = faulty.comparison.first_divergence
            seen["oracle"] = {"fault_tap": None if first is None else first.tap,
                              "clean": None if held is None else (held.passed, held.comparison.summary())}
        else:
            assert faulty is None and held is None
    if rank == 0:
        torch.save(seen, out)
    dist.barrier()
    dist.destroy_process_group()


def _gather(obj) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _spawn(world: int, tmp_path, presets=TEST_PRESETS, oracle: bool = True, clean: bool = False,
           model: str = "tiny") -> dict:
    out = str(tmp_path / "rank0.pt")
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank_main, args=(world, rendezvous, out, presets, oracle, clean, model), nprocs=world, join=True)
    return torch.load(out)


def _check_against_world_one_and_reference(seen: dict, world: int) -> None:
    for preset, got in seen.items():
        if preset == "oracle":
            continue
        cfg, weights = resolve(preset, torch.float32, "cpu", 0)
        single = Runner(preset, **ENGINE).run(PROMPTS, **{**RUN, "return_logits": False})
        assert got["tokens"] == [r.tokens for r in single], f"{preset}: greedy tokens differ from world size 1"
        ref = Gemma4Reference(cfg, weights)
        for p, tokens, logits in zip(PROMPTS, got["tokens"], got["logits"]):
            truth = ref(torch.tensor(p + tokens))  # every position's logits (the last token is fed too)
            assert logits.shape == truth.shape
            # fp32 rounding, all-reduce order included, is ~1e-4 on logits capped at 30; a wrong shard is O(1).
            err = float((logits - truth).abs().max())
            assert err < 1e-3, f"{preset}: sharded logits off the reference by {err:.3g}"
        for spec in cfg.layers:  # each pool holds the rank's KV heads only
            assert got["pool_heads"][spec.index] == len(parallel.kv_heads(spec.num_kv_heads, 0, world))
        assert got["q_rows"] == cfg.num_attention_heads // world * cfg.layers[0].head_dim
        assert got["held"] == [_shard_bytes(cfg, world)] * world, f"{preset}: a rank holds more than its shard"


# The ranks here run on the CPU over gloo (CI's machine). On a GPU machine Triton compiles the
# kernels for the GPU, and they cannot read CPU tensors; there, bench/tp_check.py runs world size 1
# over NCCL, and several GPUs are issue 15's run.
cpu_ranks = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU ranks over gloo need Triton's interpreter; "
                               "on a GPU machine: bench/tp_check.py (world 1, NCCL)")
# The torchrun tests below inject no fault, so on a GPU machine their CPU ranks run the kernels'
# torch twins (`--ops eager`, design note 47) instead of being skipped; here, the kernels.
OPS_ON_CPU_RANKS = ["--ops", "eager"] if torch.cuda.is_available() else []


def _torchrun(nproc: int) -> list[str]:
    """torchrun's command line on a free rendezvous port: two torchruns in parallel test workers
    both on the default 29500 fail with EADDRINUSE (seen on the H200's 12 workers)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(parallel._free_port())]


def _check_oracle(seen: dict) -> None:
    oracle = seen["oracle"]
    assert oracle["fault_tap"] == FAULTS[FAULT].expect  # every tap before it, gathered, holds parity
    if oracle["clean"] is not None:
        passed, summary = oracle["clean"]
        assert passed, summary


@cpu_ranks
def test_world_size_2_matches_world_size_1_and_the_reference_and_the_oracle_localizes_a_shard_fault(tmp_path):
    seen = _spawn(2, tmp_path)
    _check_against_world_one_and_reference(seen, 2)
    _check_oracle(seen)


@cpu_ranks
@pytest.mark.slow  # about 20-40 s of ranks on 2 cores: world size 2 stays in the main suite
def test_world_size_2_from_checkpoints_reads_its_slices_and_matches_world_size_1_and_the_oracle(tmp_path, checkpoints):
    """Each rank reads only its slices of a transformers checkpoint (the Runner, and the oracle's
    other rank); greedy tokens equal world size 1's, logits the reference's, every rank holds its
    shard's bytes, and `check --tp`'s judgement holds parity and localizes the shard fault."""
    seen = _spawn(2, tmp_path, presets=tuple(checkpoints.values()), clean=True, model=checkpoints["tiny"])
    _check_against_world_one_and_reference(seen, 2)
    _check_oracle(seen)


@cpu_ranks
@pytest.mark.slow  # about 20-40 s of ranks on 2 cores: world size 2 stays in the main suite
def test_world_size_4_replicates_kv_heads_and_matches(tmp_path):
    seen = _spawn(4, tmp_path, presets=("tiny-moe",), oracle=False)  # every KV head replicated here
    _check_against_world_one_and_reference(seen, 4)


@cpu_ranks
@pytest.mark.slow
def test_world_size_4_on_every_test_architecture_under_the_oracle(tmp_path):
    seen = _spawn(4, tmp_path, clean=True)
    _check_against_world_one_and_reference(seen, 4)
    _check_oracle(seen)


@pytest.mark.slow
def test_torchrun_check_tp_2_writes_the_report_on_rank_0(tmp_path):
    import subprocess

    out = tmp_path / "report"
    cmd = [*_torchrun(2), "-m", "oracle.cli", "check",
           "tiny", "--tp", "2", "--device", "cpu", "--scenario", "decode-past-window", "--out", str(out),
           *OPS_ON_CPU_RANKS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("holds parity") == 1  # rank 0 alone reports
    assert (out / "report.html").exists()


# -- serving under tensor parallelism ----------------------------------------------------------


class _Pipe:
    """broadcast_object between two threads: the lead's object reaches the follower, in order."""

    def __init__(self, lead: bool, channel):
        self.lead, self.channel = lead, channel

    def broadcast_object(self, obj, src: int = 0):
        if self.lead:
            self.channel.put(obj)
            return obj
        return self.channel.get(timeout=60)


def test_a_follower_replays_the_lead_engines_calls_and_samples_the_same_tokens():
    """serve --tp's lockstep (optimized/serve/replicated.py), without processes: the follower
    replays adds (seeded and unseeded sampling, greedy), an abort, idle heartbeats and steps, and
    produces the lead's tokens step for step."""
    import queue
    import threading

    pytest.importorskip("fastapi", reason="optimized.serve needs the serve extra")
    from optimized.engine import SamplingParams
    from optimized.serve.replicated import LeadEngine, follow
    from tests.engine_helpers import engine as make_engine

    channel = queue.Queue()
    lead = LeadEngine(make_engine(max_context=40), _Pipe(True, channel))
    follower_engine, seen = make_engine(max_context=40), []
    step = follower_engine.step
    follower_engine.step = lambda: seen.append([(e.rid, e.token) for e in step()])
    thread = threading.Thread(target=follow, args=(follower_engine, _Pipe(False, channel)))
    thread.start()
    lead.heartbeat()
    lead.add_request([5, 9, 200, 17, 3], SamplingParams(max_new_tokens=6, temperature=0.9, ignore_eos=True))
    lead.add_request([7, 7, 1], SamplingParams(max_new_tokens=4, ignore_eos=True))
    doomed = lead.add_request([4, 2], SamplingParams(max_new_tokens=9, temperature=1.0, seed=3, ignore_eos=True))
    with pytest.raises(ValueError):  # refused on the lead: never sent
        lead.add_request([], SamplingParams())
    lead_seen = []
    while lead.has_work():
        lead_seen.append([(e.rid, e.token) for e in lead.step()])
        if len(lead_seen) == 2:
            lead.abort(doomed)
            lead.heartbeat()
    lead.close()
    thread.join(60)
    assert not thread.is_alive()
    assert seen == lead_seen and len(lead_seen) >= 6


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _environ(pid: int) -> list[str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read().decode(errors="replace").split("\0")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds rank 0's process through Linux's /proc")
def test_torchrun_serve_tp_2_answers_the_reference_tokens_and_stops(tmp_path):
    import json
    import subprocess
    import time
    import urllib.request

    pytest.importorskip("fastapi", reason="serve needs the serve extra")
    from tests.engine_helpers import reference_greedy

    port = parallel._free_port()
    cmd = [*_torchrun(2), "-m", "oracle.cli", "serve",
           "tiny", "--tp", "2", "--device", "cpu", "--port", str(port), *OPS_ON_CPU_RANKS]
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
                time.sleep(1)
        prompt = [5, 9, 200, 17, 3, 8]
        body = json.dumps({"input_ids": prompt, "sampling": {"max_new_tokens": 5, "ignore_eos": True}}).encode()
        for wait in (0, 6):  # the second after an idle spell: heartbeats kept the other rank waiting
            time.sleep(wait)
            req = urllib.request.Request(url + "/generate", data=body, headers={"Content-Type": "application/json"})
            answer = json.loads(urllib.request.urlopen(req, timeout=120).read())
            assert answer["output_ids"] == reference_greedy("tiny", prompt, 5)
        # SIGTERM to rank 0's process alone (a process manager's stop): it shuts down and tells
        # the other rank, and every process exits 0 with no traceback. (It used to die by the
        # signal uvicorn re-raises, and rank 1 failed with gloo's "Connection closed by peer".)
        rank0 = [pid for pid in _children(proc.pid) if "RANK=0" in _environ(pid)]
        assert len(rank0) == 1, rank0
        os.kill(rank0[0], signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in out and "shut down" in out, out[-3000:]
    finally:
        if proc.poll() is None:  # torchrun itself, signalled, prints its own traceback: not ours
            proc.kill()
            proc.wait()
