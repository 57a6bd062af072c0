"""The context-coded id codec (tokray.storage.entropy): exact round trips, the coded size of the
shipped CIFAR-10 tokens against the order-0 bound, and malformed input raising ValueError."""

import pickle

import numpy as np
import pytest

from tokray.storage.entropy import (ContextModel, coded_bits, decode_ids, encode_ids, fit_context_model,
                                    order0_bits)

SMALL = [[("left", 8), ("up", 4)]]  # a quick model for the tests that are not about size


def same_model(a, b):
    return (a.fingerprint == b.fingerprint and np.array_equal(a.bias, b.bias) and a.features == b.features
            and all(np.array_equal(x, y) for x, y in zip(a.weights + a.groups, b.weights + b.groups)))


def roundtrip(ids, model, **kw):
    data = encode_ids(ids, model, **kw)
    out = decode_ids(data, model, len(ids), ids.shape[1:])
    assert out.dtype == np.uint16 and out.shape == ids.shape
    np.testing.assert_array_equal(out, ids)
    return data


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def random_model(rng):
    ids = rng.integers(0, 512, (600, 8, 8)).astype(np.uint16)
    return fit_context_model(ids, 512, candidates=SMALL)


@pytest.mark.parametrize("n,lanes", [(1, None), (2, None), (700, None), (513, None), (1025, None), (40, 1),
                                     (300, 7), (300, 299), (300, 300)])
def test_random_ids(rng, random_model, n, lanes):
    ids = rng.integers(0, 512, (n, 8, 8)).astype(np.uint16)
    roundtrip(ids, random_model, lanes=lanes)


def test_one_sample_and_empty(rng, random_model):
    one = rng.integers(0, 512, (1, 8, 8)).astype(np.uint16)
    roundtrip(one, random_model)
    empty = np.zeros((0, 8, 8), np.uint16)
    assert decode_ids(encode_ids(empty, random_model), random_model, 0, (8, 8)).shape == (0, 8, 8)


def test_codebook_edges(rng, random_model):
    for ids in (np.zeros((50, 8, 8), np.uint16), np.full((50, 8, 8), 511, np.uint16),
                rng.choice(np.array([0, 511], np.uint16), (77, 8, 8))):
        roundtrip(ids, random_model)
        roundtrip(ids.astype(np.int64), random_model)  # any integer dtype in


def test_ids_the_model_never_saw(rng):
    seen = rng.integers(0, 64, (400, 8, 8)).astype(np.uint16)  # only ids 0..63 when fitting
    for cands in ([[]], SMALL, [[("left", 16), ("up", 8)]]):
        model = fit_context_model(seen, 512, candidates=cands)
        assert (model.frequencies() >= 1).all()
        assert (model.frequencies().sum(1) == 1 << model.scale_bits).all()
        roundtrip(rng.integers(0, 512, (300, 8, 8)).astype(np.uint16), model)  # unseen ids, unseen contexts
        roundtrip(np.full((9, 8, 8), 511, np.uint16), model)


def test_predictable_ids(rng):
    ids = np.zeros((400, 8, 8), np.uint16)  # one id nearly everywhere: frequencies past half the total
    ids[rng.random(ids.shape) < 0.02] = 511
    model = fit_context_model(ids, 512)
    data = roundtrip(ids, model)
    assert len(data) * 8 < 0.4 * ids.size  # ~0.15 bits/token of ids + the lanes: well below 1 bit
    roundtrip(rng.integers(0, 512, (20, 8, 8)).astype(np.uint16), model)


@pytest.mark.parametrize("grid,k", [((1, 1), 2), ((1, 7), 3), ((5, 1), 1000), ((3, 5), 512), ((2, 2), 65536)])
def test_odd_grids_and_codebooks(rng, grid, k):
    ids = rng.integers(0, k, (257,) + grid).astype(np.uint16)
    model = fit_context_model(ids, k, candidates=[[], [("left", 4), ("up", 2)]] if k < 65536 else [[]])
    roundtrip(ids, model)
    roundtrip(ids[:1], model)
    roundtrip(np.full((3,) + grid, k - 1, np.uint16), model)


def test_32x32_with_8192_codes(rng):
    from tokray.data.synth import SynthTokens

    ids, _, _ = SynthTokens(grid=(32, 32), codebook_size=8192).chunk(0, 96)
    model = fit_context_model(ids, 8192, candidates=[[("left", 8), ("up", 4)]])
    assert same_model(ContextModel._parse(model.to_bytes()), model)
    data = roundtrip(ids, model)
    assert len(data) * 8 < order0_bits(ids, 8192) * ids.size  # neighbours pay even on 96 samples
    roundtrip(ids[:1], model)
    roundtrip(rng.integers(0, 8192, (5, 32, 32)).astype(np.uint16), model)  # ids it never saw
    roundtrip(np.tile(np.array([0, 8191], np.uint16), (3, 32, 16)), model)
    assert not model._packed  # the two-lookup table layout: flipped bits raise here too
    for i in rng.integers(0, len(data), 20):
        bad = bytearray(data)
        bad[i] ^= 1 << int(rng.integers(8))
        with pytest.raises(ValueError):
            decode_ids(bytes(bad), model, len(ids), (32, 32))


def test_model_bytes(random_model):
    b = random_model.to_bytes()
    m = ContextModel.from_bytes(b)
    assert m.to_bytes() == b and same_model(m, random_model)
    np.testing.assert_array_equal(m.frequencies(), random_model.frequencies())
    assert ContextModel.from_bytes(bytearray(b)) is m  # cached: tables are built once per process
    assert len(pickle.dumps(m.prepare())) < len(b) + 200  # pickled as its bytes, not its tables
    for bad in (b[:5], b[:-3], b[:12] + bytes([b[12] ^ 1]) + b[13:], b"XXXX" + b[4:], b[:-1] + bytes([b[-1] ^ 0x40])):
        with pytest.raises(ValueError):
            ContextModel.from_bytes(bad)


def test_bad_input_raises_value_error(rng, random_model):
    ids = rng.integers(0, 512, (300, 8, 8)).astype(np.uint16)
    data = encode_ids(ids, random_model)
    other = fit_context_model(ids, 512, candidates=[[("left", 4)]])
    with pytest.raises(ValueError):
        encode_ids(np.full((2, 8, 8), 512, np.uint16), random_model)  # outside the codebook
    with pytest.raises(ValueError):
        encode_ids(ids.reshape(300, 64), random_model)
    for bad, n, grid, model in [(data[:-4], 300, (8, 8), random_model), (data[:3], 300, (8, 8), random_model),
                                (data + b"\0\0\0\0", 300, (8, 8), random_model), (data, 299, (8, 8), random_model),
                                (data, 300, (4, 16), random_model), (data, 300, (8, 8), other),
                                (b"\x07" + data[1:], 300, (8, 8), random_model)]:
        with pytest.raises(ValueError):
            decode_ids(bad, model, n, grid)
    for i in rng.integers(0, len(data), 40):  # any flipped bit: ValueError (the ids carry a CRC32)
        bad = bytearray(data)
        bad[i] ^= 1 << int(rng.integers(8))
        with pytest.raises(ValueError):
            decode_ids(bytes(bad), random_model, 300, (8, 8))


@pytest.fixture(scope="module")
def cifar():
    from tokray.assets import default_tokens
    from tokray.storage.dataset import open_dataset

    ds = open_dataset(default_tokens("train"))
    return ds, [b["ids"] for b in ds.iter_batches(8192)]


def test_shipped_cifar_tokens_below_order0(cifar):
    ds, shards = cifar
    k = ds.meta.codebook_size
    ids = np.concatenate(shards)
    model = fit_context_model(ids, k, candidates=[[("left", 32), ("up", 16)]])
    mbytes = len(model.to_bytes())
    assert same_model(ContextModel._parse(model.to_bytes()), model)
    coded = [roundtrip(s, model) for s in shards]
    stored_bits = 8 * (mbytes + sum(len(c) for c in coded)) / ids.size
    bound = order0_bits(ids, k)
    assert bound > 8.8
    assert stored_bits < bound - 0.7, (stored_bits, bound)  # about 8.08 against 8.91
    lanes = sum(min(len(s), 512) for s in shards)  # a shard: ideal bits + ~8 bits per lane + 14 bytes
    assert 0 < 8 * sum(len(c) for c in coded) - coded_bits(ids, model) < 12 * lanes + 8 * 14 * len(shards)
    from tokray.storage.formats.tokens import FORMAT

    parquet = sum(len(FORMAT.encode_shard(FORMAT.records_to_table(None, b["ids"], b["label"], b["sample_id"])))
                  for b in ds.iter_batches(8192))  # what format 1 stores
    assert mbytes + sum(len(c) for c in coded) < parquet * 0.9


def test_fit_is_deterministic_and_fits_one_sample(rng):
    """The same ids give the same model bytes (a copy of a context-coded dataset is byte-identical)."""
    ids = rng.integers(0, 512, (300, 8, 8)).astype(np.uint16)
    assert fit_context_model(ids, 512).to_bytes() == fit_context_model(ids.copy(), 512).to_bytes()
    one = np.array([[[0, 511], [511, 0]]], np.uint16)
    model = fit_context_model(one, 512)
    roundtrip(one, model)
    roundtrip(rng.integers(0, 512, (30, 2, 2)).astype(np.uint16), model)


def test_the_shipped_shards_are_coded_with_the_shipped_model(cifar):
    """Re-coding the shipped ids under the stored model gives exactly the stored streams."""
    from tokray.storage.formats.tokens import MODEL_FILE

    ds, shards = cifar
    model = ContextModel.from_bytes(ds.read_file(MODEL_FILE))
    assert model.codebook_size == ds.meta.codebook_size and min(s.min() for s in shards) == 0
    assert max(s.max() for s in shards) == model.codebook_size - 1  # the codebook's edges occur
    for info, ids in zip(ds.manifest.shards, shards):
        assert ds.store.read_shard_bytes(info).endswith(roundtrip(ids, model))
