"""import-seit: SeiT's released token files (written here in that exact format) round-trip exactly."""

import gzip
import io
import json

import numpy as np
import pytest
import torch

from conftest import run_job
from tokray.data.seit_import import decode_seit_tokens, encode_seit_tokens
from tokray.storage.dataset import open_dataset

K, D = 391, 32  # SeiT's codebook: 391 codes of dimension 32


def _random_ids(rng, n, t, k=K):
    ids = rng.integers(0, k, size=(n, t))
    ids[0, :4] = [0, 254, 255, k - 1]  # the edges of one and two byte codes
    ids[1, :] = 255  # a whole image of escapes
    return ids


def _write_seit(dir_, ids, labels, codebook, *, data=None, offsets=None):
    """Files exactly as SeiT releases them; ``data``/``offsets`` override the encoded tokens."""
    if data is None:
        data, offsets = encode_seit_tokens(ids)
    paths = {k: str(dir_ / name) for k, name in [("data", "val-token.data.bin.gz"),
                                                 ("index", "val-token.index.npy.gz"),
                                                 ("labels", "val-label.txt"), ("codebook", "codebook.ckpt")]}
    with open(paths["data"], "wb") as f:
        f.write(gzip.compress(data))
    buf = io.BytesIO()
    np.save(buf, np.asarray(offsets, dtype=np.int64))
    with open(paths["index"], "wb") as f:
        f.write(gzip.compress(buf.getvalue()))
    with open(paths["labels"], "w") as f:
        f.write("".join(f"{int(c)}\n" for c in labels))
    torch.save(codebook, paths["codebook"])
    return paths


def _import(paths, dst, *extra):
    return run_job("jobs/dataset.py", "-q", "import-seit", paths["data"], paths["labels"], paths["codebook"],
                   str(dst), *extra)


@pytest.mark.parametrize("grid", [(4, 4), (32, 32)])
def test_import_roundtrip(tmp_path, grid):
    rng = np.random.default_rng(0)
    n, t = 50, grid[0] * grid[1]
    ids = _random_ids(rng, n, t)
    assert (ids >= 255).mean() > 0.3  # many escapes
    labels = rng.integers(0, 7, size=n)
    codebook = torch.randn(K, D)
    paths = _write_seit(tmp_path, ids, labels, codebook)
    dst = tmp_path / "ds"

    out = _import(paths, dst, "--grid", *map(str, grid), "--shard-rows", "16")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["num_samples"] == n and result["codebook_size"] == K and result["shards"] == 4

    ds = open_dataset(str(dst))
    assert ds.meta.grid == grid and ds.meta.codebook_size == K
    assert ds.meta.class_names == tuple(f"class{c}" for c in range(labels.max() + 1))
    assert ds.meta.tokenizer.startswith("seit-codebook:")
    assert ds.meta.extra == {"source": "seit", "codebook_shape": [K, D]}
    batches = list(ds.iter_batches(batch_size=7))
    got = {k: np.concatenate([b[k] for b in batches]) for k in ("ids", "label", "sample_id")}
    np.testing.assert_array_equal(got["ids"], ids.reshape(n, *grid))
    np.testing.assert_array_equal(got["label"], labels)
    np.testing.assert_array_equal(got["sample_id"], np.arange(n))

    from safetensors.torch import load_file
    stored = load_file(str(dst / "codebook.safetensors"))
    assert torch.equal(stored["codebook"], codebook)


def test_decode_encode_roundtrip():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 511, size=(40, 64))  # K large enough for a second byte of 255 (id 510)
    ids[0, :6] = [510, 510, 255, 510, 0, 254]  # runs of 255 bytes that mix escapes and second bytes
    ids[1, -1] = 510
    ids[3, -1] = 7  # a one-byte last token, so cutting one byte loses exactly one token
    data, offsets = encode_seit_tokens(ids)
    assert b"\xff\xff\xff\xff" in data
    np.testing.assert_array_equal(decode_seit_tokens(data, offsets, 64), ids)
    # a slice of the index (as the importer streams it) decodes the same images
    np.testing.assert_array_equal(decode_seit_tokens(data, offsets[10:21], 64), ids[10:20])
    assert encode_seit_tokens(ids[:1])[0][:4] == bytes([255, 255, 255, 255])
    with pytest.raises(ValueError, match="image 3 decodes to 63 tokens, expected 64"):
        decode_seit_tokens(data, np.concatenate([offsets[:4], offsets[4:] - 1]), 64)
    cut = encode_seit_tokens(ids[:2])[0][:-1]  # image 1 ends in the escape of its id 510
    with pytest.raises(ValueError, match="image 1 ends with an escape byte"):
        decode_seit_tokens(cut, [0, offsets[1], len(cut)], 64)
    with pytest.raises(ValueError, match="ids 0..510"):
        encode_seit_tokens(np.array([[511]]))


def test_truncated_image_fails_naming_it(tmp_path):
    rng = np.random.default_rng(2)
    ids = _random_ids(rng, 20, 16)
    per_image = [encode_seit_tokens(ids[i:i + 1])[0] for i in range(20)]
    per_image[13] = encode_seit_tokens(ids[13:14, :15])[0]  # image 13 lost its last token
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in per_image])])
    paths = _write_seit(tmp_path, ids, rng.integers(0, 5, 20), torch.randn(K, D),
                        data=b"".join(per_image), offsets=offsets)
    out = _import(paths, tmp_path / "ds", "--grid", "4", "4", "--shard-rows", "8")
    assert out.returncode == 2, (out.stdout, out.stderr)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "image 13" in errors[0] and "15 tokens" in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_bad_inputs(tmp_path):
    rng = np.random.default_rng(3)
    ids = _random_ids(rng, 10, 16)
    paths = _write_seit(tmp_path, ids, rng.integers(0, 5, 9), torch.randn(K, D))  # one label short
    out = _import(paths, tmp_path / "ds", "--grid", "4", "4")
    assert out.returncode == 2 and "9 labels" in out.stderr and "10 images" in out.stderr, out.stderr

    paths = _write_seit(tmp_path, ids, rng.integers(0, 5, 10), {"codebook": torch.randn(300, D)})
    out = _import(paths, tmp_path / "ds", "--grid", "4", "4")
    assert out.returncode == 2 and "token id 390" in out.stderr and "K = 300" in out.stderr, out.stderr

    out = _import({**paths, "codebook": str(tmp_path / "missing.ckpt")}, tmp_path / "ds", "--grid", "4", "4")
    assert out.returncode == 2 and "missing.ckpt" in out.stderr, out.stderr
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_decode_hand_written_bytes():
    """Independent of our encoder: the escape coding spelled out byte by byte."""
    data = bytes([3, 255, 0, 255, 45, 255, 255, 254,  # image 0: 3, 255, 300, 510, 254 ... (5 tokens)
                  255, 135, 0, 1, 2, 254])  # image 1: 390, 0, 1, 2, 254
    got = decode_seit_tokens(data, np.array([0, 8, 14]), 5)
    np.testing.assert_array_equal(got, [[3, 255, 300, 510, 254], [390, 0, 1, 2, 254]])


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_damaged_data_file_is_one_line(damage, tmp_path):
    rng = np.random.default_rng(4)
    ids = _random_ids(rng, 40, 16)
    paths = _write_seit(tmp_path, ids, rng.integers(0, 5, 40), torch.randn(K, D))
    raw = open(paths["data"], "rb").read()
    with open(paths["data"], "wb") as f:
        f.write(raw[: len(raw) // 2] if damage == "truncated" else b"plain bytes, no gzip header" * 10)
    out = _import(paths, tmp_path / "ds", "--grid", "4", "4")
    errors = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "val-token.data.bin.gz" in errors[0] and "gzip" in errors[0]
