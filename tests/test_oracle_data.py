"""The data half of the oracle: tap names, capture reassembly and storage, metrics, tolerance
budgets and the first-divergence comparison (on real captures of the tiny reference model)."""

from __future__ import annotations

import json
import random

import pytest
import torch

import reference
import reference.model as reference_model
from oracle import capture as capture_mod
from oracle.capture import (Capture, CaptureBuilder, CaptureError, RequestCapture, capture_metadata, load_capture,
                            save_capture)
from oracle.compare import CompareError, compare
from oracle.metrics import (cosine_similarity, error_metrics, head_profile, max_abs_error, mismatch_fraction,
                            position_profile, rel_l2, ulp, ulp_distance, ulp_histogram)
from oracle.taps import (Tap, TapNameError, parse_tap, sort_taps, tap_name, tap_order, tap_trailing_shape,
                         truth_counterpart)
from oracle.tolerance import DEFAULT_TOLERANCE, DEFAULT_FLOORS, Tolerance, judge

T = 20  # tokens per request: more than the tiny preset's sliding window (5)


@pytest.fixture(scope="module")
def tiny():
    config, weights = reference.resolve("tiny", dtype=torch.float64, seed=0)
    ids = torch.randint(0, config.vocab_size, (T,), generator=torch.Generator().manual_seed(1))
    return config, weights, ids


def reference_taps(tiny, dtype) -> dict[str, torch.Tensor]:
    """Taps of the reference run in `dtype`, on the float64 weights cast to it (same weights)."""
    config, weights, ids = tiny
    model = reference.Gemma4Reference(config, {k: v.to(dtype) for k, v in weights.items()})
    taps = {}
    model(ids, taps=taps)
    return taps


def capture_of(tiny, taps, dtype, path, request="r0", positions=None) -> Capture:
    config = tiny[0]
    builder = CaptureBuilder(capture_metadata(config, path=path, dtype=dtype))
    builder.add_taps(request, torch.arange(T) if positions is None else positions, taps)
    return builder.build()


@pytest.fixture(scope="module")
def truth(tiny):
    return capture_of(tiny, reference_taps(tiny, torch.float64), torch.float64, "truth")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def ref_taps(tiny, request):
    return request.param, reference_taps(tiny, request.param)


# --------------------------------------------------------------------------------------
# Tap names
# --------------------------------------------------------------------------------------


def test_tap_order_matches_the_reference_dataflow(tiny):
    config = tiny[0]
    order = tap_order(config)
    assert order[:2] == ["embed", "ple"] and order[-2:] == ["final_norm", "logits"]
    kinds = ("q", "k", "v", "o", "attn_out", "mlp_gate_up", "mlp_act", "mlp_out", "out")
    assert order[2:2 + len(kinds)] == [f"layers.0.{k}" for k in kinds]
    assert len(order) == 2 + len(kinds) * config.num_hidden_layers + 2
    # The reference records taps as it computes them: its dict order is the dataflow order.
    assert list(reference_taps(tiny, torch.float64)) == order
    assert sort_taps(reversed(order)) == order


def test_tap_order_without_ple_and_with_pool_taps():
    config = reference.get_preset("tiny-kv-eq-v")
    assert "ple" not in tap_order(config)
    with_cache = tap_order(config, include_cache=True)
    i = with_cache.index("layers.2.v")
    assert with_cache[i + 1:i + 4] == ["layers.2.k_cache", "layers.2.v_cache", "layers.2.o"]
    assert sort_taps(reversed(with_cache)) == with_cache


def test_parse_tap_names():
    assert parse_tap("layers.3.q") == Tap(3, "q")
    assert parse_tap("logits") == Tap(None, "logits")
    assert parse_tap("layers.12.v_cache").is_cache
    assert parse_tap("layers.3.o").axes == ("position", "head", "dim")
    assert tap_name("attn_out", 7) == "layers.7.attn_out"
    assert truth_counterpart("layers.4.k_cache") == "layers.4.k"
    assert truth_counterpart("layers.4.o") == "layers.4.o"
    for bad in ["layer.3.q", "layers.3.foo", "layers.03.q", "layers.-1.q", "layers.3", "logit", "", None]:
        with pytest.raises(TapNameError):
            parse_tap(bad)


def test_trailing_shapes_match_the_reference(tiny):
    for name, tensor in reference_taps(tiny, torch.float64).items():
        assert tuple(tensor.shape[1:]) == tap_trailing_shape(tiny[0], name), name


# --------------------------------------------------------------------------------------
# Reassembly
# --------------------------------------------------------------------------------------


def chunk_pieces(taps, chunks, request="r0"):
    """Split taps [T, ...] into (request, tap, positions, rows) pieces along position ranges."""
    return [(request, name, torch.arange(a, b), tensor[a:b]) for name, tensor in taps.items() for a, b in chunks]


PREFILL_THEN_DECODE = [(0, 7), (7, 12)] + [(p, p + 1) for p in range(12, T)]


def test_builder_reassembles_shuffled_chunks_and_decode_steps(tiny):
    taps = reference_taps(tiny, torch.float32)
    pieces = chunk_pieces(taps, PREFILL_THEN_DECODE) + chunk_pieces(taps, [(0, 11), (11, T)], request="r/1 ü")
    random.Random(0).shuffle(pieces)
    builder = CaptureBuilder({"path": "optimized"})
    for request, name, positions, rows in pieces:
        builder.add(request, name, positions, rows)
    capture = builder.build()
    assert set(capture.requests) == {"r0", "r/1 ü"}
    for req in capture.requests.values():
        assert torch.equal(req.positions, torch.arange(T))
        assert list(req.taps) and all(torch.equal(req.taps[n], taps[n]) for n in taps)


def test_builder_keeps_positions_that_do_not_start_at_zero(tiny):
    taps = reference_taps(tiny, torch.float32)
    builder = CaptureBuilder()
    for _, name, positions, rows in reversed(chunk_pieces(taps, [(4, 9), (9, T)])):
        builder.add("r0", name, positions, rows)
    req = builder.build().requests["r0"]
    assert torch.equal(req.positions, torch.arange(4, T))
    assert torch.equal(req.taps["layers.3.q"], taps["layers.3.q"][4:])


def test_builder_refuses_duplicate_positions(tiny):
    taps = reference_taps(tiny, torch.float32)
    builder = CaptureBuilder()
    for piece in chunk_pieces(taps, [(0, 8), (8, T), (6, 9)]):  # the last chunk overlaps both
        builder.add(*piece)
    duplicated = r"request 'r0', tap 'embed': positions captured more than once: \[6, 7, 8\]"
    with pytest.raises(CaptureError, match=duplicated):
        builder.build()


def test_builder_refuses_a_gap(tiny):
    taps = reference_taps(tiny, torch.float32)
    builder = CaptureBuilder()
    for piece in chunk_pieces(taps, [(0, 8), (10, T)]):
        builder.add(*piece)
    with pytest.raises(CaptureError, match=r"missing positions \[8, 9\]"):
        builder.build()


def test_builder_refuses_a_tap_short_of_the_others(tiny):
    taps = reference_taps(tiny, torch.float32)
    builder = CaptureBuilder()
    for request, name, positions, rows in chunk_pieces(taps, [(0, 8), (8, T)]):
        if not (name == "layers.6.mlp_out" and positions[0] == 8):
            builder.add(request, name, positions, rows)
    with pytest.raises(CaptureError, match=r"tap 'layers.6.mlp_out': missing positions \[8, 9, 10"):
        builder.build()


def test_builder_checks_expected_positions(tiny):
    taps = reference_taps(tiny, torch.float32)
    builder = CaptureBuilder()
    builder.add_taps("r0", torch.arange(T - 1), {k: v[:-1] for k, v in taps.items()})
    assert builder.build().requests["r0"].positions.numel() == T - 1
    with pytest.raises(CaptureError, match=rf"missing positions \[{T - 1}\]"):
        builder.build(expected_positions={"r0": torch.arange(T)})
    with pytest.raises(CaptureError, match="'r9': expected but no piece"):
        builder.build(expected_positions={"r0": torch.arange(T - 1), "r9": [0]})


def test_builder_refuses_malformed_pieces():
    builder = CaptureBuilder()
    with pytest.raises(CaptureError, match="3 rows but 2 positions"):
        builder.add("r0", "embed", [0, 1], torch.zeros(3, 4))
    with pytest.raises(CaptureError, match="not a tap name"):
        builder.add("r0", "layers.1.qq", [0], torch.zeros(1, 4))
    with pytest.raises(CaptureError, match="non-empty string"):
        builder.add(7, "embed", [0], torch.zeros(1, 4))
    with pytest.raises(CaptureError, match="1-D integer"):
        builder.add("r0", "embed", torch.tensor([0.5]), torch.zeros(1, 4))
    builder.add("r0", "embed", [0], torch.zeros(1, 4))
    with pytest.raises(CaptureError, match="does not match the earlier pieces"):
        builder.add("r0", "embed", [1], torch.zeros(1, 5))


def test_builder_copies_pieces():
    buffer = torch.zeros(2, 4)
    builder = CaptureBuilder()
    builder.add("r0", "embed", [0, 1], buffer)
    buffer += 1  # a serving path reuses its buffers in place
    assert builder.build().tap("r0", "embed").sum() == 0


def test_pool_taps_carry_their_own_positions(tiny):
    taps = reference_taps(tiny, torch.float32)
    builder = CaptureBuilder()
    builder.add_taps("r0", torch.arange(T), taps)
    window = torch.arange(T - 5, T)
    builder.add("r0", "layers.1.k_cache", window, taps["layers.1.k"][T - 5:])
    req = builder.build().requests["r0"]
    assert torch.equal(req.positions, torch.arange(T))
    assert torch.equal(req.positions_of("layers.1.k_cache"), window)
    assert torch.equal(req.positions_of("layers.1.k"), torch.arange(T))


# --------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------


ODD_IDS = ["plain", "with/slash", "../escape", "sp ace\nnewline", "ü€🙂", "tap/embed"]


@pytest.fixture(scope="module")
def small_capture(tiny):
    taps = reference_taps(tiny, torch.bfloat16)
    builder = CaptureBuilder(capture_metadata(tiny[0], path="optimized", dtype=torch.bfloat16,
                                              scenario={"seed": 3, "chunk_boundaries": {"plain": [8]}}))
    for i, rid in enumerate(ODD_IDS):
        start = i  # positions need not start at 0
        builder.add_taps(rid, torch.arange(start, T), {k: v[start:] for k, v in list(taps.items())[:12]})
    builder.add("plain", "layers.1.v_cache", torch.arange(T - 5, T), taps["layers.1.v"][T - 5:])
    builder.add("plain", "layers.2.k_cache", torch.arange(T - 5, T), taps["layers.2.k"][T - 5:])
    return builder.build()


def assert_same_capture(a: Capture, b: Capture):
    assert a.metadata == b.metadata
    assert list(a.requests) == list(b.requests)
    for rid, ra in a.requests.items():
        rb = b.requests[rid]
        assert torch.equal(ra.positions, rb.positions)
        assert list(ra.taps) == list(rb.taps)
        for name, t in ra.taps.items():
            assert t.dtype == rb.taps[name].dtype and torch.equal(t, rb.taps[name]), (rid, name)
        assert ra.tap_positions.keys() == rb.tap_positions.keys()
        assert all(torch.equal(p, rb.tap_positions[n]) for n, p in ra.tap_positions.items())


def test_save_load_round_trip_is_exact(small_capture, tmp_path):
    target = save_capture(small_capture, tmp_path / "cap")
    loaded = load_capture(target)
    assert_same_capture(small_capture, loaded)
    assert loaded.metadata["dtype"] == "bfloat16" and loaded.metadata["path"] == "optimized"
    assert loaded.metadata["schema_version"] == capture_mod.SCHEMA_VERSION
    assert set(loaded.metadata["versions"]) >= {"python", "torch", "triton", "transformers"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cap"]  # no staging directory left


@pytest.mark.parametrize("atomic_exchange", [True, False], ids=["exchange", "rename-aside"])
def test_existing_target_is_refused_unless_overwrite(small_capture, tmp_path, monkeypatch, atomic_exchange):
    if not atomic_exchange:  # the fallback for systems without renameat2
        monkeypatch.setattr(capture_mod, "_exchange", lambda a, b: False)
    target = save_capture(small_capture, tmp_path / "cap")
    with pytest.raises(CaptureError, match="already exists"):
        save_capture(small_capture, target)
    smaller = Capture({"plain": small_capture.requests["plain"]}, {"note": "second"})
    save_capture(smaller, target, overwrite=True)
    assert_same_capture(smaller, load_capture(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cap"]


def test_overwrite_refuses_a_directory_that_is_not_a_capture(small_capture, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(CaptureError, match="not a capture directory"):
        save_capture(small_capture, tmp_path / "precious", overwrite=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


@pytest.fixture
def saved(small_capture, tmp_path):
    target = save_capture(small_capture, tmp_path / "cap")
    manifest = json.loads((target / "manifest.json").read_text())
    return target, manifest


def test_corrupt_manifest_is_refused(saved):
    target, _ = saved
    (target / "manifest.json").write_text('{"format": "gemma4-testbed-capture", "requests": [')
    with pytest.raises(CaptureError, match=r"manifest\.json: not valid JSON"):
        load_capture(target)


def test_unknown_schema_version_is_refused(saved):
    target, manifest = saved
    manifest["schema_version"] = 99
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CaptureError, match="schema version 99 is not the supported 1"):
        load_capture(target)


@pytest.mark.parametrize("field,value", [("dtype", 5), ("ops", ["eager"])])
def test_metadata_fields_of_the_wrong_type_are_refused(saved, field, value):
    target, manifest = saved
    manifest["metadata"][field] = value
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CaptureError, match=rf"metadata\.{field}: expected a string, got {value!r}".replace("[", r"\[")):
        load_capture(target)


def test_truncated_tensor_file_is_refused(saved):
    target, manifest = saved
    file = target / manifest["requests"][0]["file"]
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(CaptureError, match=rf"{file.name}: .* bytes, the manifest records .*truncated"):
        load_capture(target)


def test_flipped_byte_fails_the_checksum(saved):
    target, manifest = saved
    file = target / manifest["requests"][2]["file"]
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(CaptureError, match=rf"{file.name}: sha256 does not match"):
        load_capture(target)


def test_missing_tensor_file_is_refused(saved):
    target, manifest = saved
    entry = manifest["requests"][1]
    (target / entry["file"]).unlink()
    expected = rf"{entry['file']}: missing \(listed in the manifest for request 'with/slash'\)"
    with pytest.raises(CaptureError, match=expected):
        load_capture(target)


def test_manifest_shape_mismatch_is_refused(saved):
    target, manifest = saved
    tap = manifest["requests"][0]["taps"][3]
    tap["shape"][0] += 1
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CaptureError, match=rf"tap '{tap['name']}' has shape .*, manifest records"):
        load_capture(target)


def test_manifest_dtype_mismatch_is_refused(saved):
    target, manifest = saved
    manifest["requests"][0]["taps"][0]["dtype"] = "float32"
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CaptureError, match="has dtype bfloat16, manifest records 'float32'"):
        load_capture(target)


def test_file_name_outside_the_capture_is_refused(saved):
    target, manifest = saved
    manifest["requests"][0]["file"] = "../elsewhere.safetensors"
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CaptureError, match="bad file name"):
        load_capture(target)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(CaptureError, match="no capture directory"):
        load_capture(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptureError, match="manifest.json: missing"):
        load_capture(tmp_path / "empty")


class Crash(Exception):
    pass


def crash_on_second_file(monkeypatch):
    real, calls = capture_mod.write_durably, []

    def writer(path, data):
        calls.append(path)
        if len(calls) == 2:
            real(path, data[:len(data) // 2])  # half a file, then the crash
            raise Crash("disk full, say")
        real(path, data)

    monkeypatch.setattr(capture_mod, "write_durably", writer)


def test_crash_mid_write_leaves_no_capture(small_capture, tmp_path, monkeypatch):
    crash_on_second_file(monkeypatch)
    with pytest.raises(Crash):
        save_capture(small_capture, tmp_path / "cap")
    assert list(tmp_path.iterdir()) == []  # no target, staging cleaned up
    with pytest.raises(CaptureError):
        load_capture(tmp_path / "cap")


def test_hard_crash_mid_write_leaves_nothing_that_loads(small_capture, tmp_path, monkeypatch):
    # A killed process gets no cleanup: keep the staging directory and check it is not a capture.
    crash_on_second_file(monkeypatch)
    monkeypatch.setattr(capture_mod.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(Crash):
        save_capture(small_capture, tmp_path / "cap")
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".cap.writing-")
    for path in [tmp_path / "cap", leftovers[0]]:
        with pytest.raises(CaptureError):
            load_capture(path)


def test_crash_while_overwriting_keeps_the_old_capture(small_capture, tmp_path, monkeypatch):
    target = save_capture(small_capture, tmp_path / "cap")
    crash_on_second_file(monkeypatch)
    with pytest.raises(Crash):
        save_capture(Capture(dict(small_capture.requests), {"new": True}), target, overwrite=True)
    assert_same_capture(small_capture, load_capture(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cap"]


def test_save_refuses_an_inconsistent_capture(small_capture, tmp_path):
    req = small_capture.requests["plain"]
    bad = RequestCapture(req.positions, {"embed": req.taps["embed"][:-1]})
    with pytest.raises(CaptureError, match="does not have one row per position"):
        save_capture(Capture({"r": bad}), tmp_path / "cap")
    with pytest.raises(CaptureError, match="strictly increasing"):
        unsorted = RequestCapture(req.positions.flip(0), {"embed": req.taps["embed"]})
        save_capture(Capture({"r": unsorted}), tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_metadata_must_be_plain_json(small_capture, tmp_path):
    with pytest.raises(CaptureError, match="not plain JSON"):
        save_capture(Capture(small_capture.requests, {"dtype": torch.float32}), tmp_path / "cap")
    assert not (tmp_path / "cap").exists()


def test_metadata_records_the_run(tiny):
    meta = capture_metadata(tiny[0], path="reference", dtype=torch.bfloat16, device="cpu", scenario={"a": 1})
    assert meta["model_config"] == tiny[0].to_hf_dict()
    assert (meta["path"], meta["dtype"], meta["device"], meta["scenario"]) == ("reference", "bfloat16", "cpu", {"a": 1})
    assert meta["versions"]["torch"] and meta["versions"]["python"].count(".") == 2
    with pytest.raises(CaptureError, match="path must be one of"):
        capture_metadata(tiny[0], path="fast", dtype=torch.float32)


def test_git_revision_never_fails(tmp_path, monkeypatch):
    assert capture_mod.git_revision(tmp_path) is None  # not a repository
    monkeypatch.setenv("PATH", str(tmp_path))  # no git binary at all
    assert capture_mod.git_revision(".") is None


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def test_ulp_of_known_values():
    x = torch.tensor([1.0, 1.5, 2.0, 3.0, 0.75, -4.0, 0.0])
    assert ulp(x, torch.bfloat16).tolist() == [2 ** -7, 2 ** -7, 2 ** -6, 2 ** -6, 2 ** -8, 2 ** -5, 2 ** -133]
    assert ulp(torch.tensor([1.0]), "float16").item() == 2 ** -10
    assert ulp(torch.tensor([1.0]), torch.float32).item() == 2 ** -23
    # A bf16 value's neighbour (next bit pattern, one step away from zero) is exactly one ULP away.
    v = torch.tensor([1.0, 3.0, 100.0, -0.01, 1e-39]).to(torch.bfloat16)
    neighbour = (v.view(torch.int16) + 1).view(torch.bfloat16)
    assert ulp_distance(neighbour, v, torch.bfloat16).tolist() == [1.0] * 5


def test_ulp_histogram_buckets():
    truth = torch.tensor([1.0, 1.0, 2.0, 4.0, 1.0, 1.0 + 2 ** -8, 1.0], dtype=torch.float64)
    cand = torch.tensor([1.0, 1 + 2 ** -7, 2 + 2 * 2 ** -6, 4 + 3 * 2 ** -5, 1 + 10 * 2 ** -7, 1.0, 1 + 1.5 * 2 ** -7],
                        dtype=torch.float64)
    d = ulp_distance(cand, truth, torch.bfloat16)
    assert d.tolist() == [0.0, 1.0, 2.0, 3.0, 10.0, 0.5, 1.5]
    # Nearest whole ULP, ties down: 0.5 (a correctly rounded tie) is 0, 1.5 is 1.
    assert ulp_histogram(d) == {"0": 2, "1": 2, "2": 1, "3-4": 1, "5-8": 0, "9-16": 1}
    m = error_metrics(cand, truth, ulp_dtype="bfloat16")
    assert m.ulp.max == 10.0 and m.ulp.histogram["9-16"] == 1 and m.ulp.dtype == "bfloat16"


def test_max_abs_location_and_values():
    truth = torch.zeros(3, 4, 5, dtype=torch.float64)
    cand = truth.clone()
    cand[0, 0, 0] = 0.25
    cand[2, 1, 3] = -0.5
    assert max_abs_error(cand, truth) == (0.5, (2, 1, 3))
    m = error_metrics(cand, truth)
    assert m.max_abs_index == (2, 1, 3) and m.candidate_at_max == -0.5 and m.truth_at_max == 0.0


def test_cosine_rel_l2_and_mismatch_fraction_by_hand():
    assert cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == 0.0
    assert cosine_similarity(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 4.0])) == pytest.approx(1.0)
    assert cosine_similarity(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -2.0])) == pytest.approx(-1.0)
    assert rel_l2(torch.tensor([3.0, 5.0]), torch.tensor([3.0, 4.0])) == pytest.approx(0.2)
    assert rel_l2(torch.zeros(2), torch.zeros(2)) == 0.0
    assert mismatch_fraction(torch.tensor([0.0, 0.1, 0.3, 1.0]), torch.zeros(4), threshold=0.2) == 0.5
    with pytest.raises(ValueError, match="shape mismatch"):
        rel_l2(torch.zeros(2), torch.zeros(3))


def test_nan_and_inf_are_counted_not_averaged():
    truth = torch.tensor([1.0, 2.0, 3.0, float("inf"), 5.0, 6.0])
    cand = torch.tensor([float("nan"), 2.0, float("-inf"), float("inf"), 5.0, float("nan")])
    m = error_metrics(cand, truth)
    assert (m.candidate_nan, m.candidate_inf, m.truth_nonfinite, m.new_nonfinite) == (2, 2, 1, 3)
    assert m.compared == 2 and m.rel_l2 == 0.0  # the finite pairs agree
    json.dumps(m.to_dict(), allow_nan=False)


def test_error_profiles_by_position_and_head():
    truth = torch.ones(4, 3, 2, dtype=torch.float64)
    cand = truth.clone()
    cand[2, 1, :] = 2.0  # position 2, head 1 is off by 100 %
    rows = position_profile(cand, truth)
    assert rows.tolist() == pytest.approx([0.0, 0.0, (2 / 6) ** 0.5, 0.0])
    heads = head_profile(cand, truth)
    assert heads.tolist() == pytest.approx([0.0, (2 / 8) ** 0.5, 0.0])


# --------------------------------------------------------------------------------------
# Tolerance
# --------------------------------------------------------------------------------------


def noisy(truth, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return truth + scale * torch.randn(truth.shape, generator=g, dtype=truth.dtype)


def test_budget_is_a_multiple_of_the_noise_plus_a_floor():
    truth = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = noisy(truth, 1e-3, 1)
    verdict = judge(noisy(truth, 1e-3, 2), ref, truth, torch.bfloat16)  # another draw of the same noise
    assert verdict.passed, verdict.reasons
    tol = Tolerance()
    assert verdict.budget.rel_l2 == pytest.approx(tol.multiple * verdict.noise.rel_l2 + DEFAULT_FLOORS["bfloat16"])
    assert verdict.budget.max_abs == pytest.approx(
        tol.max_abs_multiple * verdict.noise.max_abs + DEFAULT_FLOORS["bfloat16"] * verdict.noise.truth_max_abs)
    bad = judge(noisy(truth, 2e-2, 3), ref, truth, torch.bfloat16)
    assert not bad.passed and bad.ratio > 1 and "relative L2 error" in bad.reasons[0]


def test_floor_applies_where_the_reference_is_exact():
    truth = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = truth.clone()
    floor = DEFAULT_TOLERANCE.floor(torch.float32)
    assert judge(truth * (1 + floor / 2), exact, truth, torch.float32).passed
    assert not judge(truth * (1 + floor * 2), exact, truth, torch.float32).passed


def test_one_outlier_fails_the_max_abs_budget():
    truth = torch.randn(64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = noisy(truth, 1e-3, 1)
    cand = noisy(truth, 1e-3, 2)
    cand[5, 7] += 0.5  # small in L2 over 2048 elements, far outside any rounding
    verdict = judge(cand, ref, truth, torch.bfloat16)
    assert not verdict.passed and any("max abs error" in r for r in verdict.reasons)
    assert verdict.error.max_abs_index == (5, 7)


def test_new_nan_fails_even_when_the_numbers_agree():
    truth = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cand = truth.clone()
    cand[3] = float("nan")
    verdict = judge(cand, truth.clone(), truth, torch.float32)
    assert not verdict.passed and "NaN/Inf" in verdict.reasons[0]


# --------------------------------------------------------------------------------------
# compare, on real reference captures
# --------------------------------------------------------------------------------------


def test_candidate_equal_to_the_reference_passes(tiny, truth, ref_taps):
    dtype, taps = ref_taps
    ref = capture_of(tiny, taps, dtype, "reference")
    result = compare(truth, ref, capture_of(tiny, taps, dtype, "optimized"), tiny[0])
    assert result.passed, result.summary()
    assert result.summary().startswith("PARITY") and result.counts()["taps_judged"] == len(taps)


def test_candidate_with_reference_sized_noise_passes(tiny, truth, ref_taps):
    # Same error size as the reference, different error pattern: what a correct kernel with
    # another rounding order looks like. Not at embed/ple: they are one rounding of the token ids'
    # rows (no other order), so a correct path matches the reference there bit for bit, and an
    # error pattern without the reference's rounded scale is what the paired drift check flags.
    dtype, taps = ref_taps
    truth_taps = truth.requests["r0"].taps
    shuffled = {n: t if n in ("embed", "ple") else (truth_taps[n] + (t.double() - truth_taps[n]).flip(0)).to(dtype)
                for n, t in taps.items()}
    result = compare(truth, capture_of(tiny, taps, dtype, "reference"),
                     capture_of(tiny, shuffled, dtype, "optimized"), tiny[0])
    assert result.passed, result.summary()


def test_model_fault_is_found_at_its_layer_and_tensor(tiny, truth, monkeypatch):
    # Scale head 0 of layer 4's attention output (the fifth attend call) by 1.01 inside the
    # model: the error then flows on through every later layer.
    real_attend, calls = reference_model.attend, []

    def faulty_attend(*args):
        calls.append(1)
        out = real_attend(*args)  # [B, heads, T, D]
        if len(calls) == 5:
            out[:, 0] *= 1.01
        return out

    ref = capture_of(tiny, reference_taps(tiny, torch.float32), torch.float32, "reference")
    monkeypatch.setattr(reference_model, "attend", faulty_attend)
    faulty = reference_taps(tiny, torch.float32)
    # Taps arrive in any order from a serving path; the verdict must not depend on it.
    cand = capture_of(tiny, dict(reversed(faulty.items())), torch.float32, "optimized")

    result = compare(truth, ref, cand, tiny[0])
    assert not result.passed
    first = result.first_divergence
    assert (first.layer, first.kind, first.tap) == (4, "o", "layers.4.o")
    assert result.summary().startswith("DIVERGENCE at layer 4, tensor o (layers.4.o)")
    rows = result.requests[0].rows
    assert [r.tap for r in rows] == tap_order(tiny[0])
    assert all(r.status == "pass" for r in rows[:rows.index(first.row)])
    assert {"layers.4.attn_out", "layers.9.out", "logits"} <= {r.tap for r in rows if r.status == "fail"}
    assert first.heads[0]["head"] == 0  # the faulty head is the worst
    assert len(first.heads) == tiny[0].num_attention_heads
    assert first.worst_elements[0].coords["head"] == 0
    assert first.worst_elements[0].abs_error == pytest.approx(first.row.verdict.error.max_abs)
    growth = result.requests[0].layer_growth["kinds"]["out"]
    assert growth["candidate"][9] > growth["budget"][9] and growth["candidate"][3] <= growth["budget"][3]


@pytest.mark.parametrize("tap", ["layers.2.k", "layers.7.mlp_out", "final_norm"])
def test_perturbed_tap_is_named_in_bf16(tiny, truth, tap):
    # In bf16 the tiny model's reference error grows to 5-8 % relative L2 by layer 7, so the
    # budget there is about 30 %: a perturbation must be larger than that to be a divergence.
    taps = reference_taps(tiny, torch.bfloat16)
    bad = dict(taps)
    bad[tap] = taps[tap] * 1.5
    result = compare(truth, capture_of(tiny, taps, torch.bfloat16, "reference"),
                     capture_of(tiny, bad, torch.bfloat16, "optimized"), tiny[0])
    assert result.first_divergence.tap == tap
    assert result.counts()["taps_failed"] == 1


def chunked_candidate(tiny, taps, start, chunks, cache_rows, chunk_boundaries=None):
    """An optimized-path capture: prefix hit up to `start`, chunked pieces in shuffled order,
    plus pool taps of sliding layer 1 over the last W positions."""
    config = tiny[0]
    scenario = {"chunk_boundaries": {"r0": chunk_boundaries}} if chunk_boundaries else {}
    builder = CaptureBuilder(capture_metadata(config, path="optimized", dtype=torch.float32, scenario=scenario))
    pieces = chunk_pieces(taps, chunks)
    random.Random(1).shuffle(pieces)
    for piece in pieces:
        builder.add(*piece)
    window = torch.arange(T - config.sliding_window, T)
    builder.add("r0", "layers.1.k_cache", window, cache_rows["k"])
    builder.add("r0", "layers.1.v_cache", window, cache_rows["v"])
    return builder.build()


def test_chunked_candidate_with_pool_taps(tiny, truth):
    config = tiny[0]
    taps = reference_taps(tiny, torch.float32)
    ref = capture_of(tiny, taps, torch.float32, "reference")
    W = config.sliding_window
    cache = {"k": taps["layers.1.k"][T - W:].clone(), "v": taps["layers.1.v"][T - W:].clone()}
    chunks = [(4, 10), (10, 16)] + [(p, p + 1) for p in range(16, T)]
    boundaries = [4, 10] + list(range(16, T))

    clean = compare(truth, ref, chunked_candidate(tiny, taps, 4, chunks, cache, boundaries), config)
    assert clean.passed, clean.summary()
    row = next(r for r in clean.requests[0].rows if r.tap == "layers.1.k_cache")
    assert row.status == "pass" and row.truth_tap == "layers.1.k" and row.positions == W

    # A stale pool slot: position T-3's K row holds the key of position 2.
    cache["k"][W - 3] = truth.requests["r0"].taps["layers.1.k"][2].float()
    broken = compare(truth, ref, chunked_candidate(tiny, taps, 4, chunks, cache, boundaries), config)
    first = broken.first_divergence
    assert first.tap == "layers.1.k_cache" and first.layer == 1 and first.kind == "k_cache"
    assert first.positions[0]["position"] == T - 3 and first.positions[0]["chunk"] == boundaries.index(T - 3) + 1
    assert first.worst_elements[0].position == T - 3
    assert [c["start"] for c in first.chunks] == [10, 16, 17, 18, 19]  # the window starts inside chunk [10, 16)
    assert max(first.chunks, key=lambda c: c["max_rel_error"])["worst_position"] == T - 3
    assert "layers.1.k_cache" in broken.summary()


def test_missing_taps_are_reported_not_judged(tiny, truth):
    taps = reference_taps(tiny, torch.float32)
    ref = capture_of(tiny, taps, torch.float32, "reference")
    partial = {n: t for n, t in taps.items() if n not in ("ple", "layers.3.mlp_out")}
    result = compare(truth, ref, capture_of(tiny, partial, torch.float32, "optimized"), tiny[0])
    assert result.passed
    missing = [r["tap"] for r in result.to_dict()["requests"][0]["missing"]]
    assert missing == ["ple", "layers.3.mlp_out"]
    assert "2 taps present in one capture but not another" in result.summary()


def test_missing_request_fails(tiny, truth):
    taps = reference_taps(tiny, torch.float32)
    ref = capture_of(tiny, taps, torch.float32, "reference")
    result = compare(truth, ref, capture_of(tiny, taps, torch.float32, "optimized", request="other"), tiny[0])
    assert not result.passed and result.missing_requests == ["r0"] and result.extra_requests == ["other"]
    assert result.summary().startswith("NO VERDICT")


def test_positions_the_truth_lacks_are_misaligned(tiny, truth):
    taps = reference_taps(tiny, torch.float32)
    ref = capture_of(tiny, taps, torch.float32, "reference")
    shifted = capture_of(tiny, taps, torch.float32, "optimized", positions=torch.arange(T) + 3)
    result = compare(truth, ref, shifted, tiny[0])
    assert not result.passed
    assert result.first_divergence.tap == "embed" and result.first_divergence.row.status == "misaligned"
    assert f"[{T}, {T + 1}, {T + 2}] are not in the truth" in result.summary()


def test_inputs_that_cannot_be_compared_raise(tiny, truth):
    taps = reference_taps(tiny, torch.float32)
    ref = capture_of(tiny, taps, torch.float32, "reference")
    with pytest.raises(CompareError, match="reference was captured in float32 but the candidate in bfloat16"):
        compare(truth, ref, capture_of(tiny, taps, torch.bfloat16, "optimized"), tiny[0])
    with pytest.raises(CompareError, match="another model config"):
        compare(truth, ref, ref, reference.get_preset("tiny-moe"))


def test_comparison_to_dict_is_plain_json(tiny, truth):
    taps = reference_taps(tiny, torch.bfloat16)
    bad = dict(taps, **{"layers.5.attn_out": taps["layers.5.attn_out"] * 2})
    bad["logits"] = taps["logits"].clone()
    bad["logits"][3, 7] = float("nan")
    result = compare(truth, capture_of(tiny, taps, torch.bfloat16, "reference"),
                     capture_of(tiny, bad, torch.bfloat16, "optimized"), tiny[0], chunk_boundaries={"r0": [10]})
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert set(d) == {"passed", "dtype", "truth_dtype", "tolerance", "counts", "first_divergence", "requests",
                      "missing_requests", "extra_requests", "notes", "summary"}
    assert d["first_divergence"]["tap"] == "layers.5.attn_out"
    assert [c["start"] for c in d["first_divergence"]["chunks"]] == [0, 10]
    req = d["requests"][0]
    assert set(req) == {"request", "passed", "first_divergence", "rows", "layer_growth", "chunk_starts", "missing"}
    growth = req["layer_growth"]["kinds"]["out"]
    assert len(growth["candidate"]) == tiny[0].num_hidden_layers and None not in growth["reference"]
    logits_row = next(r for r in req["rows"] if r["tap"] == "logits")
    assert logits_row["status"] == "fail" and logits_row["error"]["new_nonfinite"] == 1
    assert {"tap", "status", "ratio", "error", "noise", "budget", "worst"} <= set(logits_row)


def test_first_divergence_is_the_earliest_over_all_requests(tiny, truth):
    taps = reference_taps(tiny, torch.float32)

    def two_requests(late_fault, early_fault, path):
        builder = CaptureBuilder(capture_metadata(tiny[0], path=path, dtype=torch.float32))
        for request, fault in (("a", late_fault), ("b", early_fault)):
            builder.add_taps(request, torch.arange(T), {n: t * 1.001 if n == fault else t for n, t in taps.items()})
        return builder.build()

    two_truths = Capture({"a": truth.requests["r0"], "b": truth.requests["r0"]}, truth.metadata)
    result = compare(two_truths, two_requests(None, None, "reference"),
                     two_requests("layers.7.mlp_out", "layers.2.k", "optimized"), tiny[0])
    assert [r.first_divergence.tap for r in result.requests] == ["layers.7.mlp_out", "layers.2.k"]
    assert (result.first_divergence.request, result.first_divergence.tap) == ("b", "layers.2.k")
    assert "2 of 2 requests diverge" in result.summary()


def test_rows_past_a_near_tie_expert_choice_leave_the_global_judgement_causally():
    """compare._clear_routing: a near tie at layer 1 of position 1 takes that row out of its own
    layer-1 MoE output and everything after, and every later position from layer 2 on (attention
    carries the flip as keys and values); earlier positions and earlier stages stay judged."""
    from oracle.capture import RequestCapture
    from oracle.compare import _clear_routing
    from oracle.replay import NO_TIE

    positions = torch.arange(4)
    truth = RequestCapture(positions)
    ties = torch.tensor([NO_TIE, 1, NO_TIE, NO_TIE])
    rows = torch.randn(4, 3)
    aligned = (rows, rows.clone(), rows.clone(), positions)

    def kept(tap):
        out, left_out = _clear_routing(tap, aligned, truth, ties)
        return [] if out is None else out[3].tolist(), left_out

    assert kept("embed") == ([0, 1, 2, 3], 0)
    assert kept("layers.1.q") == ([0, 1, 2, 3], 0)  # before the layer's experts
    assert kept("layers.1.out") == ([0, 2, 3], 1)  # after row 1's own expert choice
    assert kept("layers.2.k_cache") == ([0], 3)  # rows 1-3 read row 1's flipped keys
    assert kept("logits") == ([0], 3)
    assert _clear_routing("layers.2.q", aligned, truth, torch.tensor([0, NO_TIE, NO_TIE, NO_TIE]))[0] is None
    assert _clear_routing("logits", aligned, truth, None) == (aligned, 0)  # models without experts
