"""Batched sampling on the device (optimized/engine/sampler.py): the cuts, penalties, logit_bias,
keyed noise that makes a seeded request independent of its batch, and logprobs of sampled and
prompt tokens checked against the eager reference's log_softmax."""

from __future__ import annotations

import pytest
import torch

from optimized.engine import Engine, SamplingParams
from optimized.engine.sampler import TeacherSampler, gumbel_noise, sample_batch
from tests.engine_helpers import engine as tiny_engine, model as tiny_model

PROMPT = [5, 9, 2, 77, 31, 140, 12, 200, 33]


@pytest.fixture(scope="module")
def model():
    return tiny_model("tiny")


def engine(model, **kw):
    return tiny_engine("tiny", **kw)  # the same weights as `model`: both are engine_helpers' tiny


def draws(logits, params, n=600):
    """n draws from one row, each keyed by its own step (independent noise)."""
    rows = logits[None].expand(n, -1)
    return sample_batch(rows, [params] * n, [7] * n, list(range(n)), [[]] * n).tokens


# -- the cuts ------------------------------------------------------------------------------


def test_cuts_and_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert set(draws(logits, SamplingParams(temperature=1.0, top_k=2))) == {0, 1}
    assert set(draws(logits, SamplingParams(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 + 0.3 reach it
    assert set(draws(logits, SamplingParams(temperature=1.0, min_p=0.25))) == {0, 1, 2}  # 0.05 < 0.25 * 0.5
    counts = torch.bincount(torch.tensor(draws(logits, SamplingParams(temperature=1.0), 4000)), minlength=4) / 4000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    hot = torch.bincount(torch.tensor(draws(logits, SamplingParams(temperature=4.0), 4000)), minlength=4) / 4000
    assert hot[3] > 0.15  # a high temperature flattens


def test_rows_with_different_params_in_one_batch():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=0.4)]
    for step in range(50):
        assert sample_batch(logits, params, [1, 2, 3], [step] * 3, [[]] * 3).tokens == [0, 0, 0]


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    assert sample_batch(logits, [SamplingParams()] * 2, [0, 0], [0, 0], [[], []]).tokens == [1, 0]
    with_lp = [SamplingParams(logprobs=2)] * 2  # the float32 path, too
    assert sample_batch(logits, with_lp, [0, 0], [0, 0], [[], []]).tokens == [1, 0]


def test_a_temperature_or_top_p_too_small_for_float32_is_the_greedy_limit():
    # x / 1e-320 (0 in float32) was all infinities and NaN, and argmax took id 0; such rows now get the
    # limit t -> 0 (the most likely ids), and rows beside them draw as before.
    logits = torch.tensor([[-20.0, -3.0, -1.0, -7.0], [-20.0, -3.0, -1.0, -7.0], [0.0, 5.0, 5.0, 1.0]])
    for t in (1e-320, 5e-324, 1e-40, 1e-30):
        params = [SamplingParams(temperature=t), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=t)]
        for step in range(20):
            tokens = sample_batch(logits, params, [1, 2, 3], [step] * 3, [[]] * 3).tokens
            assert tokens[:2] == [2, 2] and tokens[2] in (1, 2)
    # top_p 1e-320 is 0 in float32 and cut even the most likely id: the gather at index -1 raised.
    for p in (1e-320, 5e-324):
        params = [SamplingParams(temperature=1.0, top_p=p), SamplingParams(temperature=1e-320, top_p=p)]
        assert sample_batch(logits[:2], params, [1, 2], [0, 0], [[], []]).tokens == [2, 2]


def test_numbers_past_float64_are_refused_and_big_ones_become_floats():
    # An integer temperature of 10**30 reached torch.tensor as an int and overflowed in an engine step.
    assert SamplingParams(temperature=10**30).temperature == 1e30 and type(SamplingParams(top_p=1).top_p) is float
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty"):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: 10**400})


def test_penalties_and_logit_bias():
    logits = torch.tensor([[0.0, 1.0, 0.5, -5.0]])

    def pick(history=(), **kw):
        return sample_batch(logits, [SamplingParams(**kw)], [0], [0], [list(history)]).tokens[0]

    assert pick() == 1
    assert pick([1, 1], frequency_penalty=0.2) == 1  # 1 - 2 * 0.2 = 0.6 > 0.5
    assert pick([1, 1], frequency_penalty=0.3) == 2  # 1 - 0.6 = 0.4 < 0.5
    assert pick([1], presence_penalty=0.6) == 2 and pick([1, 1, 1], presence_penalty=0.4) == 1  # once, not per use
    assert pick([1], presence_penalty=-1.0, logit_bias={2: 1.0}) == 1
    assert pick(logit_bias={3: 10}) == 3 and pick(logit_bias={"0": 1.5}) == 0  # JSON keys are strings
    # logprobs see the penalised logits
    d = sample_batch(logits, [SamplingParams(logprobs=1, logit_bias={3: 10})], [0], [0], [[]])
    assert d.tokens == [3] and d.logprobs[0] == pytest.approx(float(torch.log_softmax(
        logits[0] + torch.tensor([0, 0, 0, 10.0]), -1)[3]))


def test_gumbel_noise_is_keyed_and_looks_uniform():
    a = gumbel_noise([1, 2, 1], [0, 0, 5], 5000, "cpu")
    assert torch.equal(a[0], gumbel_noise([1], [0], 5000, "cpu")[0])  # a row's noise ignores its batch mates
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    u = torch.exp(-torch.exp(-a))  # back to uniforms
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    big = gumbel_noise([2 ** 63 - 1], [10 ** 6], 10, "cpu")
    assert torch.isfinite(big).all()


# -- through the engine ----------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, dict(top_p=0.9, top_k=40), dict(min_p=0.05), dict(frequency_penalty=1.0,
                                                                                        presence_penalty=0.5)])
def test_seeded_tokens_do_not_depend_on_the_batch(model, extra):
    params = SamplingParams(max_new_tokens=5, temperature=1.3, seed=2024, ignore_eos=True, **extra)
    alone = engine(model).generate([PROMPT], params)[0].tokens
    mates = [SamplingParams(max_new_tokens=3, temperature=0.9, seed=5), SamplingParams(max_new_tokens=4)]
    crowd = engine(model, chunk_size=4, token_budget=7).generate([[3, 4, 5, 6], PROMPT, [8] * 11],
                                                                  [mates[0], params, mates[1]])
    assert crowd[1].tokens == alone
    other = engine(model).generate([PROMPT], SamplingParams(max_new_tokens=5, temperature=1.3, seed=2025,
                                                            ignore_eos=True, **extra))[0].tokens
    assert other != alone


def test_logprobs_match_the_reference(model):
    _, _, ref = model
    eng = engine(model, chunk_size=4)  # a chunked prompt: prompt rows come from three steps
    rid = eng.add_request(PROMPT, SamplingParams(max_new_tokens=2, ignore_eos=True, logprobs=3, prompt_logprobs=2))
    events = []
    while eng.has_work():
        events += [e for e in eng.step() if e.rid == rid]
    tokens = [e.token for e in events]
    with torch.no_grad():
        lp = torch.log_softmax(ref.forward(torch.tensor(PROMPT + tokens)).float(), dim=-1)
    first, second = events
    assert first.prompt_logprobs[0] == (None, None) and second.prompt_logprobs is None
    assert len(first.prompt_logprobs) == len(PROMPT)
    for j in range(1, len(PROMPT)):
        got, top = first.prompt_logprobs[j]
        assert got == pytest.approx(float(lp[j - 1, PROMPT[j]]), abs=1e-4)
        assert [t for t, _ in top] == lp[j - 1].topk(2).indices.tolist()
    for k, e in enumerate(events):
        row = lp[len(PROMPT) - 1 + k]
        assert e.logprob == pytest.approx(float(row[e.token]), abs=1e-4)
        assert e.top_logprobs[0][0] == e.token == int(row.argmax()) and len(e.top_logprobs) == 3


def test_teacher_forced_tokens_get_their_logprobs(model):
    eng = engine(model, sampler=TeacherSampler({0: [7, 8]}))
    eng.add_request(PROMPT, SamplingParams(max_new_tokens=2, ignore_eos=True, logprobs=0))
    events = eng.step() + eng.step()
    assert [e.token for e in events] == [7, 8] and all(e.logprob < 0 and e.top_logprobs == () for e in events)


@pytest.mark.parametrize("kw, message", [
    (dict(presence_penalty=3), "presence_penalty"), (dict(frequency_penalty="x"), "frequency_penalty"),
    (dict(min_p=1.5), "min_p"), (dict(min_p=True), "min_p"), (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"), (dict(prompt_logprobs=1.5), "prompt_logprobs"),
    (dict(logit_bias={"a": 1}), "logit_bias"), (dict(logit_bias={1: 200}), "logit_bias"),
    (dict(logit_bias=[1, 2]), "logit_bias"), (dict(logit_bias="x"), "logit_bias"),
])
def test_bad_params_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_token_ids_outside_the_vocab_are_refused(model):
    eng = engine(model)
    with pytest.raises(ValueError, match="logit_bias"):
        eng.add_request(PROMPT, SamplingParams(logit_bias={256: 1.0}))
    assert not eng.has_work()


def test_prompt_logprobs_are_complete_when_the_prompt_is_shared(model):
    """A lent prefix's rows are never computed, so the scheduler lends none to a request that asks
    for its prompt's logprobs (a running donor's or the prefix cache's)."""
    eng = engine(model, page_size=4)
    prompt = list(range(3, 23))
    params = SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=0)
    first = [eng.add_request(prompt, params)]
    got = {e.rid: e.prompt_logprobs for e in eng.step()}  # its prompt is written now...
    first.append(eng.add_request(prompt, params))  # ...and lendable to the same prompt
    while eng.has_work():
        for e in eng.step():
            if e.prompt_logprobs is not None:
                got[e.rid] = e.prompt_logprobs
    assert all(lp is not None for rid in first for lp, _ in got[rid][1:])


def test_stop_ids_are_checked_as_a_set_and_duplicates_are_harmless():
    """The engine checked each generated token with `token in stop_token_ids`, a scan of the whole
    tuple: a request with millions of stop ids (they fit in an 8 MB body) slowed every step. The
    check is now a set built once per request; duplicates are dropped, order kept."""
    from types import SimpleNamespace

    p = SamplingParams(stop_token_ids=[7, 3, 7, 7, 3, 9], ignore_eos=True)
    assert p.stop_token_ids == (7, 3, 9) and p.stop_set == frozenset({3, 7, 9})
    assert p == SamplingParams(stop_token_ids=(7, 3, 9), ignore_eos=True)  # the set is no field

    class NoScan(tuple):
        def __contains__(self, item):
            raise AssertionError("the per-token check scanned stop_token_ids")

        def __iter__(self):
            raise AssertionError("the per-token check scanned stop_token_ids")

    object.__setattr__(p, "stop_token_ids", NoScan((7, 3, 9)))
    engine = SimpleNamespace(config=SimpleNamespace(eos_token_id=(1,)))
    seq = SimpleNamespace(params=p, tokens=[5], max_new_tokens=4)
    reason = Engine._finish_reason
    assert [reason(engine, seq, t) for t in (3, 9, 1, 5)] == ["stop", "stop", None, None]


def test_choices_share_checked_params_and_logit_bias_tensors():
    """n choices get the request's params under their own seeds without checking them again, and
    logit_bias reaches the device once per request, not rebuilt from its pairs every step."""
    p = SamplingParams(logit_bias={"3": 10, 1: -5.5}, stop_token_ids=[4, 4], seed=5)
    q = p.with_seed(6)
    assert q.seed == 6 and p.seed == 5 and q == SamplingParams(logit_bias={3: 10, 1: -5.5}, stop_token_ids=[4], seed=6)
    with pytest.raises(ValueError, match="seed"):
        p.with_seed(-1)
    ids, biases = p.bias_tensors(torch.device("cpu"))
    assert ids.tolist() == [1, 3] and biases.tolist() == [-5.5, 10.0]
    assert p.bias_tensors(torch.device("cpu"))[0] is ids  # built once
    logits = torch.zeros(3, 6)
    plain = SamplingParams(logprobs=0)
    d = sample_batch(logits, [plain, p, SamplingParams(logit_bias={5: 1.0}, logprobs=0)], [0] * 3, [0] * 3, [[]] * 3)
    assert d.tokens == [0, 3, 5]
    assert d.logprobs[0] == pytest.approx(-torch.log(torch.tensor(6.0)).item(), abs=1e-5)


def test_a_rejected_huge_list_is_quoted_short():
    with pytest.raises(ValueError, match=r"stop_token_ids must be a list of token ids, got \[0, 0.*characters\)$"):
        SamplingParams(stop_token_ids=[0] * 100_000 + ["x"])


def test_long_ids_and_names_are_quoted_as_the_server_quotes_them():
    """A 4000-digit id out of range was quoted in full (and the three largest ids were named, in
    range or not); an unknown parameter's name in full, however long or many there were."""
    huge = 7 * 10**3999
    with pytest.raises(ValueError) as e:
        SamplingParams(stop_token_ids=[1, huge, 2, 300]).check_vocab(256)
    assert str(e.value) == ("stop_token_ids token ids must lie in [0, 256), got "
                            "[70000000000000000000... (4000 digits), 300]")
    with pytest.raises(ValueError) as e:
        SamplingParams(logit_bias={1: 1.0, 2: 1.0, 300: 2.0}).check_vocab(256)
    assert str(e.value) == "logit_bias token ids must lie in [0, 256), got [300]"
    with pytest.raises(ValueError) as e:
        SamplingParams.from_dict({"x" * 5000: 1, "b": 2, 3: 4, "d": 5})  # 3: sorted() raised TypeError
    assert str(e.value).startswith(f"unknown sampling parameter(s) '{'x' * 79}... (5000 characters), 'b', 3 "
                                   "(and 1 more); known: frequency_penalty, "), e.value
    with pytest.raises(ValueError) as e:
        SamplingParams(seed=huge)
    assert str(e.value) == "seed must be null or an integer in [0, 2^63), got 70000000000000000000... (4000 digits)"
