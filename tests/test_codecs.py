"""The codecs' math (task/codecs.py) against exact answers and statistical bounds."""

from __future__ import annotations

import numpy as np
import pytest

from task.codecs import CODECS, Q8_LEVELS, Codec, encode_with_feedback, from_wire, to_wire


def _vector(size: int = 1000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=size) * rng.choice([1e-3, 1.0, 30.0], size=size)


@pytest.mark.parametrize("name", CODECS)
def test_every_codec_decodes_to_the_layout_it_declares(name):
    codec = Codec(name, chunk=64, fraction=0.05)
    vector = _vector(1001)
    parts = codec.encode(vector, seed=1)
    layout = codec.parts_layout(vector.size)
    assert set(parts) == set(layout)
    for key, (dtype, shape) in layout.items():
        assert parts[key].dtype == dtype and parts[key].shape == shape, key
    assert codec.check_parts(parts, vector.size) is None
    decoded = codec.decode(parts, vector.size)
    assert decoded.shape == vector.shape and decoded.dtype == np.float64


def test_fp32_is_the_float32_identity():
    vector = _vector().astype(np.float32).astype(np.float64)
    codec = Codec("fp32")
    assert np.array_equal(codec.decode(codec.encode(vector), vector.size), vector)


@pytest.mark.parametrize("name, relative", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_precision_rounds_to_nearest(name, relative):
    vector = np.random.default_rng(3).uniform(0.5, 60000.0, 5000) * np.sign(_vector(5000))
    codec = Codec(name)
    decoded = codec.decode(codec.encode(vector), vector.size)
    # bf16 rounds the float32 value: one more rounding, 2^-24 relative.
    assert np.all(np.abs(decoded - vector) <= (relative + 2.0**-24) * np.abs(vector))


def test_bf16_matches_truncating_float32_with_round_to_nearest_even():
    # 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one, 1.
    tie = np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8])
    codec = Codec("bf16")
    assert codec.decode(codec.encode(tie), 2).tolist() == [1.0, 1.0 + 2 * 2.0**-7]


def test_q8_error_is_below_its_chunk_scale():
    codec = Codec("q8", chunk=100)
    vector = _vector(1050)
    parts = codec.encode(vector, seed=7)
    scales = np.repeat(parts["scales"].astype(np.float64), 100)[: vector.size]
    error = np.abs(codec.decode(parts, vector.size) - vector)
    assert np.all(error < scales)
    # The scale is max |x| / 127 over the chunk (float32, never rounded below it).
    peaks = np.abs(np.pad(vector, (0, 50)).reshape(-1, 100)).max(axis=1)
    assert np.all(parts["scales"].astype(np.float64) * Q8_LEVELS >= peaks)
    assert np.allclose(parts["scales"], peaks / Q8_LEVELS, rtol=1e-6)


def test_q8_decoding_is_unbiased():
    codec = Codec("q8", chunk=32)
    vector = _vector(256, seed=2)
    draws = 4000
    decoded = np.stack([codec.decode(codec.encode(vector, seed=s), vector.size) for s in range(draws)])
    scales = np.repeat(codec.encode(vector)["scales"].astype(np.float64), 32)
    # Each decoded value is x rounded to one of two levels s apart: its variance is at most s^2/4,
    # so the mean of `draws` encodings lies within 5 standard errors, s / (2 sqrt(draws)) each.
    bound = 5 * scales / (2 * np.sqrt(draws))
    assert np.all(np.abs(decoded.mean(axis=0) - vector) <= bound)
    # And it is not exact: the rounding is stochastic, not to nearest.
    assert decoded.std(axis=0).max() > 0


def test_q8_is_seeded():
    codec = Codec("q8")
    vector = _vector()
    first, again, other = (codec.encode(vector, seed=s)["values"] for s in (5, 5, 6))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_q8_sends_an_all_zero_chunk_exactly():
    codec = Codec("q8", chunk=4)
    vector = np.array([0.0, 0.0, 0.0, 0.0, -2.5, 1.0, 0.0, 2.5])
    parts = codec.encode(vector)
    assert parts["scales"][0] == 0 and np.array_equal(codec.decode(parts, 8)[:4], np.zeros(4))


def test_topk_keeps_the_largest_magnitudes():
    codec = Codec("topk", fraction=0.3)
    vector = np.array([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, 0.05, -0.01, 0.0])
    parts = codec.encode(vector)
    assert parts["indices"].tolist() == [1, 3, 6]
    assert codec.decode(parts, 10).tolist() == [0, -5.0, 0, 3.0, 0, 0, 4.0, 0, 0, 0]


def test_error_feedback_carries_exactly_what_was_not_sent():
    codec = Codec("topk", fraction=0.1)
    rng = np.random.default_rng(4)
    residual = None
    total_in, total_sent = np.zeros(200), np.zeros(200)
    for _ in range(30):
        vector = rng.normal(size=200)
        parts, new_residual = encode_with_feedback(codec, vector, residual)
        corrected = vector + (0 if residual is None else residual)
        sent = codec.decode(parts, 200)
        unsent = np.ones(200, bool)
        unsent[parts["indices"]] = False
        assert np.array_equal(new_residual[unsent], corrected[unsent])
        assert np.array_equal(sent + new_residual, corrected)
        total_in, total_sent, residual = total_in + vector, total_sent + sent, new_residual
    # Nothing is lost over rounds: what was sent plus what is still held is all that came in.
    assert np.allclose(total_sent + residual, total_in, atol=1e-9)


@pytest.mark.parametrize("name", CODECS)
def test_log_precision_round_trips_stay_positive(name):
    codec = Codec(name, chunk=16, fraction=0.2)
    rng = np.random.default_rng(5)
    precision = np.exp(rng.uniform(-20, 25, 400))  # 2e-9 .. 7e10
    reference = precision * np.exp(rng.normal(scale=0.1, size=400))
    for ref in (None, reference):
        wire = to_wire(precision, ref, log=True)
        back = from_wire(codec.decode(codec.encode(wire, 3), 400), ref, log=True)
        assert np.all(back > 0) and np.all(np.isfinite(back))
        if name in ("fp32", "fp16", "bf16", "q8"):
            assert np.allclose(np.log(back), np.log(precision), atol=0.4 if ref is None else 0.01)


def test_shift_to_a_reference_round_trips():
    rng = np.random.default_rng(6)
    reference = rng.normal(size=50)
    vector = reference + 1e-3 * rng.normal(size=50)
    wire = to_wire(vector, reference, log=False)
    assert np.allclose(wire, vector - reference)
    assert np.allclose(from_wire(wire, reference, log=False), vector)


@pytest.mark.parametrize(
    "name, parts, reason",
    [
        ("q8", {"values": np.zeros(10, np.int8), "scales": np.array([1.0, np.nan], np.float32)},
         "finite"),
        ("q8", {"values": np.zeros(10, np.int8), "scales": np.array([1.0, -1.0], np.float32)},
         ">= 0"),
        ("q8", {"values": np.full(10, -128, np.int8), "scales": np.ones(2, np.float32)}, "lie in"),
        ("topk", {"indices": np.array([3, 10], np.uint32), "values": np.ones(2, np.float32)},
         "out of range"),
        ("topk", {"indices": np.array([3, 3], np.uint32), "values": np.ones(2, np.float32)},
         "increasing"),
        ("topk", {"indices": np.array([3, 4], np.uint32), "values": np.array([1, np.inf], np.float32)},
         "finite"),
        ("fp16", {"values": np.full(10, np.inf, np.float16)}, "finite"),
        ("bf16", {"values": np.full(10, 0x7F80, np.uint16)}, "finite"),
    ],
)
def test_check_parts_names_the_problem(name, parts, reason):
    problem = Codec(name, chunk=5, fraction=0.2).check_parts(parts, 10)
    assert problem is not None and reason in problem


def test_bad_codec_settings_are_refused():
    with pytest.raises(ValueError, match="unknown codec"):
        Codec("q4")
    with pytest.raises(ValueError, match="chunk"):
        Codec("q8", chunk=0)
    with pytest.raises(ValueError, match="fraction"):
        Codec("topk", fraction=0.0)
