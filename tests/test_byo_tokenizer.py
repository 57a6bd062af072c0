"""Bring your own tokenizer and images: the tokenizer protocol with a diffusers VQModel (a tiny, randomly
initialised one saved here: no hub), pruning any codebook to the codes used, codebook-only tokenizers
(SeiT imports), and the CIFAR-10 python archive turned into an image source."""

import gzip
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch

from conftest import run_job, write_image_folder
from tokray.data.tokenizer import TokenizerUnavailable, load_tokenizer, to_unit
from tokray.storage.dataset import open_dataset

VQ = dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, num_vq_embeddings=64, norm_num_groups=8,
          sample_size=32, layers_per_block=1)


def _vq_model(seed=0):
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(**VQ).eval()


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vq")
    _vq_model().save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imgs"), per_class=8, size=40)  # 24 images, resized to 32


def test_diffusers_adapter_is_the_models_own_quantizer_and_decoder(vq_dir):
    tok, info = load_tokenizer(f"diffusers:{vq_dir}")
    assert tok.kind == "diffusers" and info["fingerprint"] == tok.fingerprint and len(tok.fingerprint) == 16
    assert (tok.grid, tok.image_size, tok.codebook_size) == ((16, 16), 32, 64)
    assert tuple(tok.codebook.shape) == (64, 4) and tok.quantizer.codebook is not None  # the old module seam
    model = _vq_model()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    ids = tok.encode(x)
    h = model.encode(x).latents
    _, _, (_, _, idx) = model.quantize(h)
    assert torch.equal(ids, idx.view(3, 16, 16))  # VectorQuantizer's own nearest code
    q = model.quantize.get_codebook_entry(ids.reshape(-1), (3, 16, 16, 4))
    torch.testing.assert_close(tok.decode(ids), model.decode(q, force_not_quantize=True).sample.clamp(-1, 1))
    # a config plus weights is the same tokenizer; a compute dtype does not change the fingerprint
    alt, _ = load_tokenizer(f"diffusers:{vq_dir}/config.json?weights={vq_dir}/diffusion_pytorch_model.safetensors")
    assert alt.fingerprint == tok.fingerprint
    tok.to("cpu", torch.bfloat16)
    assert tok.fingerprint == alt.fingerprint and (tok.encode(x) == ids).float().mean() > 0.9
    # options change what the ids mean, so they change the fingerprint
    assert load_tokenizer(f"diffusers:{vq_dir}?norm=01")[0].fingerprint != alt.fingerprint
    with pytest.raises(ValueError, match="unknown option"):
        load_tokenizer(f"diffusers:{vq_dir}?sise=64")
    with pytest.raises(ValueError, match="is a folder; for a diffusers model write diffusers:"):
        load_tokenizer(vq_dir)


def test_bf16_weights_have_a_stable_fingerprint(tmp_path, vq_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    _vq_model().to(torch.bfloat16).save_pretrained(str(a))
    _vq_model().to(torch.bfloat16).save_pretrained(str(b))  # the same weights, saved again elsewhere
    fa, fb = (load_tokenizer(f"diffusers:{p}")[0] for p in (a, b))
    assert fa.fingerprint == fb.fingerprint == load_tokenizer(f"diffusers:{a}")[0].fingerprint
    assert fa.fingerprint != load_tokenizer(f"diffusers:{vq_dir}")[0].fingerprint  # bf16 weights differ from fp32
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(fa.encode(x), fb.encode(x))  # loaded as float32 for compute: bf16 -> fp32 is exact


def test_round_trip_tokenize_verify_decode_psnr(vq_dir, images, tmp_path):
    from tokray.data.images import ImageSource, decode_many
    from tokray.eval.metrics import psnr_db

    dst = str(tmp_path / "tokens")
    out = run_job("jobs/tokenize_images.py", "--images", images, "--dst", dst, "--tokenizer", f"diffusers:{vq_dir}",
                  "--shard-rows", "10", "--in-process")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["num_samples"] == 24 and res["tokenizer_kind"] == "diffusers"
    assert "in-process on cpu in float32" in out.stderr  # where and how the tokenizer ran, said in the log
    tok, _ = load_tokenizer(f"diffusers:{vq_dir}", for_dataset=dst)
    ds = open_dataset(dst)
    assert ds.verify() == []
    assert (ds.meta.grid, ds.meta.codebook_size, ds.meta.tokenizer) == ((16, 16), 64, tok.fingerprint)
    batch = next(ds.iter_batches(100))
    src = ImageSource(images)
    pixels, _, _ = decode_many(src, batch["sample_id"], 32)
    np.testing.assert_array_equal(tok.encode_pixels(pixels), batch["ids"])  # the stored ids are the tokenizer's
    recon = tok.decode(torch.from_numpy(batch["ids"].astype(np.int64)))
    psnr = psnr_db(recon, to_unit(pixels))
    print(f"diffusers VQModel (random init, {tok.num_parameters} parameters) round trip: PSNR {psnr:.2f} dB")
    assert np.isfinite(psnr) and psnr > 0


def test_prune_keeps_decode_exact(vq_dir, images, tmp_path, caplog):
    """Tokenize, then prune: ids remapped to 0..K-1, map and pruned codebook in the dataset,
    decode(remapped) == decode(original); the val split encodes into the same codes."""
    import logging

    from tokray.data.prune import code_counts
    from tokray.data.tokenize import TokenizeJob, tokenize, tokenize_pruned
    from tokray.data.tokenizer import PRUNE_MAP_FILE

    dst, spec = str(tmp_path / "train"), f"diffusers:{vq_dir}"
    job = TokenizeJob(images=images, dst=dst, tokenizer=spec, split="train", val_per_class=2, shard_rows=7)
    with caplog.at_level(logging.INFO, logger="tokray.data.tokenize"):
        res = tokenize_pruned(job, use_ray=False, keep_unpruned=True)
    assert "in-process on cpu in float32" in caplog.text and "pruned" in caplog.text
    full, pruned = open_dataset(res["unpruned"]), open_dataset(dst)
    used = np.flatnonzero(code_counts(full))
    assert pruned.meta.codebook_size == res["codebook_size"] == len(used) < 64 and res["codes_before"] == 64
    assert {"codebook.safetensors", PRUNE_MAP_FILE} <= set(pruned.manifest.files) and pruned.verify() == []
    assert [s.rows for s in pruned.manifest.shards] == [s.rows for s in full.manifest.shards] == [7, 7, 4]
    base, _ = load_tokenizer(spec)
    view, _ = load_tokenizer(spec, for_dataset=dst)
    assert view.kind == "pruned" and view.fingerprint == pruned.meta.tokenizer != base.fingerprint
    a, b = next(full.iter_batches(100)), next(pruned.iter_batches(100))
    assert np.array_equal(a["sample_id"], b["sample_id"]) and np.array_equal(a["label"], b["label"])
    orig, remapped = (torch.from_numpy(x["ids"].astype(np.int64)) for x in (a, b))
    assert int(remapped.max()) < len(used) and torch.equal(torch.from_numpy(used)[remapped], orig)
    assert torch.equal(view.decode(remapped), base.decode(orig))  # exact, not approximately
    cb, _ = load_tokenizer(f"codebook:{dst}")  # what training reads: the kept code vectors
    assert torch.equal(cb.codebook, base.codebook[torch.from_numpy(used)])
    # the base tokenizer is refused for the pruned ids, naming both fingerprints
    from tokray.data.tokenizer import require_same_tokenizer

    with pytest.raises(ValueError, match=base.fingerprint):
        require_same_tokenizer(pruned.meta, base.fingerprint, dst)
    # the validation split, encoded into the training split's codes (the nearest kept code)
    val = str(tmp_path / "val")
    tokenize(TokenizeJob(images=images, dst=val, tokenizer=spec, split="val", val_per_class=2, pruned_like=dst),
             use_ray=False)
    v = open_dataset(val)
    assert (v.meta.tokenizer, v.meta.codebook_size) == (pruned.meta.tokenizer, len(used))
    assert v.read_file(PRUNE_MAP_FILE) == pruned.read_file(PRUNE_MAP_FILE)


def _seit_import(tmp_path, k=40, d=8, grid=(4, 4), n=12):
    from tokray.data.seit_import import encode_seit_tokens, import_seit

    rng = np.random.default_rng(0)
    ids = rng.integers(0, k // 2, size=(n, grid[0] * grid[1]))  # half the codes unused
    data, offsets = encode_seit_tokens(ids)
    (tmp_path / "d.token.data.bin.gz").write_bytes(gzip.compress(data))
    buf = io.BytesIO()
    np.save(buf, offsets)
    (tmp_path / "d.token.index.npy.gz").write_bytes(gzip.compress(buf.getvalue()))
    (tmp_path / "labels.txt").write_text("".join(f"{i % 3}\n" for i in range(n)))
    torch.save(torch.randn(k, d), str(tmp_path / "codebook.ckpt"))
    dst = str(tmp_path / "seit")
    import_seit(str(tmp_path / "d.token.data.bin.gz"), str(tmp_path / "labels.txt"), str(tmp_path / "codebook.ckpt"),
                dst, grid=grid, shard_rows=5)
    return dst, ids


def test_codebook_only_tokenizer_refuses_images_clearly(tmp_path, images):
    from tokray.data.prune import prune_dataset

    dst, ids = _seit_import(tmp_path)
    tok, info = load_tokenizer(f"codebook:{dst}")
    assert tok.kind == "codebook" and info["fingerprint"].startswith("seit-codebook:")
    assert tuple(tok.codebook.shape) == (40, 8) and tok.grid == (4, 4) and not tok.can_decode
    for call in (lambda: tok.decode(torch.zeros(1, 4, 4, dtype=torch.long)), lambda: tok.encode(torch.zeros(1, 3, 8, 8))):
        with pytest.raises(TokenizerUnavailable, match="holds only a codebook .*SeiT import.*cannot (de|en)code images"):
            call()
    out = run_job("jobs/evaluate_tokenizer.py", "--images", images, "--tokenizer", f"codebook:{dst}",
                  "--out", str(tmp_path / "eval"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "evaluate_tokenizer needs a tokenizer that can encode images" in out.stderr.strip().splitlines()[-1]
    # a SeiT import prunes without a tokenizer (its codebook is in the dataset), decode or not
    res = prune_dataset(dst, str(tmp_path / "pruned"))
    assert (res["codes_before"], res["codebook_size"]) == (40, len(np.unique(ids)))
    p = open_dataset(str(tmp_path / "pruned"))
    keep = np.unique(ids)
    got = np.concatenate([b["ids"].reshape(len(b["ids"]), -1) for b in p.iter_batches(100)])
    assert np.array_equal(keep[got], ids)
    cb, _ = load_tokenizer(f"codebook:{tmp_path / 'pruned'}")
    torch.testing.assert_close(cb.codebook, load_tokenizer(f"codebook:{dst}")[0].codebook[torch.from_numpy(keep)])
    # pruning again composes the maps: nothing left to drop, the same fingerprint
    again = prune_dataset(str(tmp_path / "pruned"), str(tmp_path / "again"))
    assert again["codebook_size"] == len(keep) and again["tokenizer"] == res["tokenizer"]


def test_prune_needs_the_codebook_and_refuses_in_place(tmp_path):
    from conftest import write_synth
    from tokray.data.prune import prune_dataset

    src = str(tmp_path / "synth")
    write_synth(src, samples=50, shard_rows=20, codebook=64)
    with pytest.raises(ValueError, match="carries no codebook.safetensors: give the tokenizer"):
        prune_dataset(src, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="DST must differ from SRC"):
        prune_dataset(src, src)


def test_tokenadapt_trains_through_a_diffusers_tokenizer(vq_dir, images, tmp_path):
    from tokray.fit.tokenadapt import TokenAdaptConfig, train

    cfg = TokenAdaptConfig(images=images, out_dir=str(tmp_path / "ta"), tokenizer=f"diffusers:{vq_dir}", steps=2,
                           batch_size=4, warmup=1, eval_every=2, ckpt_every=2, eval_images=3, val_per_class=1,
                           model_args={"dim": 16, "depth": 1, "num_heads": 2})
    res = train(cfg, progress=False)
    assert res["steps"] == 2 and res["tokenizer"] == load_tokenizer(f"diffusers:{vq_dir}")[0].fingerprint
    dst, _ = _seit_import(tmp_path)
    with pytest.raises(TokenizerUnavailable, match="TokenAdapt training"):
        train(TokenAdaptConfig(images=images, out_dir=str(tmp_path / "ta2"), tokenizer=f"codebook:{dst}"))


def test_shipped_tokenizer_is_unchanged():
    from tokray.assets import default_tokenizer

    tok, info = load_tokenizer(default_tokenizer())
    assert tok.kind == "tokray" and info["fingerprint"] == "43cd99c722a56531"
    assert (tok.grid, tok.image_size, tok.codebook_size) == ((8, 8), 32, 512)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(tok.encode(x), tok.module.encode(x))
    assert torch.equal(tok.decode(tok.encode(x)), tok.module.decode(tok.module.encode(x)))


# -- the CIFAR-10 python archive ------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Writes strings the way Python 2's cPickle wrote the CIFAR-10 release: as byte strings (BINSTRING)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)

    dispatch[str] = _save_str
    dispatch[bytes] = _save_str


def _py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # the 2009 module path


CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_archive(path, per_batch=4, extra=None):
    rng = np.random.default_rng(0)
    batches = {}
    members = {"batches.meta": _py2_pickle({"num_cases_per_batch": per_batch, "label_names": CLASSES, "num_vis": 3072})}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batches[name] = (data, labels)
        members[name] = _py2_pickle({"batch_label": f"{name} of 5", "labels": labels, "data": data,
                                     "filenames": [f"img_{j}.png" for j in range(per_batch)]})
    members.update(extra or {})
    with tarfile.open(path, "w:gz") as tf:
        for name, data in [("readme.html", b"<html></html>"), *members.items()]:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return batches


def test_cifar_archive_becomes_an_image_source(tmp_path):
    from PIL import Image

    from tokray.data.cifar import images_from_cifar
    from tokray.data.images import ImageSource

    archive = tmp_path / "cifar-10-python.tar.gz"
    batches = _cifar_archive(archive)
    res = images_from_cifar(str(archive), str(tmp_path / "train.tar"))
    assert res["images"] == 20 and res["classes"] == CLASSES and list(res["counts"]) == ["train"]
    src = ImageSource(str(tmp_path / "train.tar"))
    assert len(src) == 20 and all(m.startswith("train/") and m.endswith(".png") for m in src.members)
    assert src.class_names == tuple(sorted(set(CLASSES[c] for b in range(1, 6) for c in batches[f"data_batch_{b}"][1])))
    # image 6 of the train split is row 2 of data_batch_2, lossless, in its class's folder
    data, labels = batches["data_batch_2"]
    name = f"train/{CLASSES[labels[2]]}/00006.png"
    i = src.members.index(name)
    with Image.open(io.BytesIO(src.read(i))) as im:
        np.testing.assert_array_equal(np.asarray(im), data[2].reshape(3, 32, 32).transpose(1, 2, 0))
    assert src.class_names[src.labels[i]] == CLASSES[labels[2]]
    again = images_from_cifar(str(archive), str(tmp_path / "train.tar"), overwrite=True)
    assert (tmp_path / "train.tar").stat().st_size == again["bytes"] == res["bytes"]  # deterministic bytes
    with pytest.raises(FileExistsError, match="--overwrite"):
        images_from_cifar(str(archive), str(tmp_path / "train.tar"))
    # both splits as JPEG files in a folder
    both = images_from_cifar(str(archive), str(tmp_path / "all"), split="all", fmt="jpeg", quality=95)
    assert {s: sum(c.values()) for s, c in both["counts"].items()} == {"train": 20, "test": 4}
    assert len(ImageSource(str(tmp_path / "all" / "test"))) == 4


def test_cifar_pickles_are_untrusted(tmp_path):
    from tokray.data.cifar import images_from_cifar

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned > /dev/null",))

    archive = tmp_path / "evil.tar.gz"
    _cifar_archive(archive, extra={"data_batch_3": pickle.dumps({"data": Evil(), "labels": [0]}, protocol=4)})
    with pytest.raises(ValueError, match=r"data_batch_3 is not a CIFAR-10 python pickle .*posix.system is not allowed"):
        images_from_cifar(str(archive), str(tmp_path / "out.tar"))
    assert not (tmp_path / "out.tar").exists() and not list(tmp_path.glob("out.tar.tmp-*"))
    (tmp_path / "other.tar.gz").write_bytes(gzip.compress(b"not a tar"))
    with pytest.raises(ValueError, match="not a readable tar"):
        images_from_cifar(str(tmp_path / "other.tar.gz"), str(tmp_path / "x.tar"))


def test_dataset_commands_images_from_cifar_and_prune(tmp_path):
    help_text = run_job("jobs/dataset.py", "--help").stdout
    if "images-from-cifar" not in help_text or "prune" not in help_text:
        pytest.skip("jobs/dataset.py has no images-from-cifar/prune subcommands yet (the integrator adds them)")
    archive = tmp_path / "cifar-10-python.tar.gz"
    _cifar_archive(archive)
    out = run_job("jobs/dataset.py", "-q", "images-from-cifar", str(archive), str(tmp_path / "c.tar"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["images"] == 20
    dst, ids = _seit_import(tmp_path)
    out = run_job("jobs/dataset.py", "-q", "prune", dst, str(tmp_path / "pruned"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["codebook_size"] == len(np.unique(ids))
