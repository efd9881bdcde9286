"""Engines on the reference's weights and the reference's own greedy continuations, shared by the
engine and prefix-cache tests: greedy output checked against the eager reference's greedy loop
on the same weights, so a scheduling bug (a chunk fed twice, a decode at the wrong position, a
window released early, a stale cached page) shows as a different token.

What runs the ops: these tests are about scheduling, pages and sampling. On a GPU their engines run
the attention kernels (the torch ops elsewhere, fused=False). Under Triton's CPU interpreter, where
one launch costs 0.1-0.2 s and CI has 20 minutes on 2 cores, they run the kernels' eager twins
(ENGINE_ATTENTION): the same paged reads through the same page tables, in torch. The kernels meet
the engine's own schedules on the CPU in the tests that ask for attention="triton" (test_engine's
greedy, eager-vs-kernel and padded-static tests), in the oracle's scenarios (`check`, the faults,
tests/test_paged_model.py) and in the attention kernels' property tests."""

from __future__ import annotations

import functools

import torch

import reference
from optimized.engine import Engine
from optimized.kernels import INTERPRETING, default_device

# The server's tests are about the HTTP API and the engine thread; under Triton's CPU interpreter a
# kernel launch costs 0.1-0.2 s, so there they serve with no Triton at all (the torch ops and the
# attention kernels' eager twins, whose equality with the kernels their own tests check). On a GPU
# they serve with the kernels. test_serve.py ties the server's tokens to an engine that runs them.
SERVE_OPS = dict(fused=False, attention="eager") if INTERPRETING else {}
ENGINE_ATTENTION = "eager" if INTERPRETING else "triton"

_MODELS: dict = {}


def model(preset):
    """(config, weights, reference model) of a preset in float32, built once per process."""
    if preset not in _MODELS:
        cfg, w = reference.resolve(preset, dtype=torch.float32, seed=0)
        _MODELS[preset] = cfg, w, reference.Gemma4Reference(cfg, w)
    return _MODELS[preset]


def engine(preset="tiny", fused=False, attention=ENGINE_ATTENTION, **kw):
    """An engine on the reference's weights. The torch ops (fused=False) by default: the fused
    kernels have their own tests; attention as the module docstring says."""
    cfg, w, _ = model(preset)
    kw.setdefault("device", default_device())
    return Engine(cfg, weights=w, dtype=torch.float32, fused=fused, attention=attention, **kw)


@functools.lru_cache(maxsize=None)
def _reference_greedy(preset, prompt: tuple, n):
    ref = model(preset)[2]
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(ref.forward(torch.tensor(ids))[-1].argmax()))
    return ids[len(prompt):]


def reference_greedy(preset, prompt, n):
    """The reference's greedy continuation: argmax of the last row, fed back, n times."""
    return _reference_greedy(preset, tuple(prompt), n)


def prompts(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
