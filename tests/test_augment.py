"""Token-domain augmentation: ColorAdapt, Emb-Noise, requantization, Token-EDA, geometry in f-space,
the pipeline's determinism and edge cases, and the shipped TokenAdapt's agreement against naive."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
from conftest import ROOT
from tokray.augment import ops
from tokray.augment.geometry import GeometrySpec, center_crop_ids, flip_theta, warp
from tokray.augment.pipeline import TokenAugment, build_token_augment
from tokray.config import AugmentConfig

CIFAR_TAR = ROOT.parent / "shared" / "datasets" / "cifar10-train.tar"  # ../shared/ beside the repo


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tokenizer():
    from tokray.assets import default_tokenizer
    from tokray.data.tokenizer import load_tokenizer

    return load_tokenizer(default_tokenizer())


@pytest.fixture(scope="module")
def codebook(tokenizer):
    return tokenizer[0].quantizer.codebook


# ColorAdapt and Emb-Noise


def test_coloradapt_matches_partner_statistics_where_applied_and_nothing_else():
    torch.manual_seed(0)
    emb = torch.randn(8, 32, 8, 8) * (0.2 + torch.rand(8, 32, 1, 1) * 3) + torch.randn(8, 32, 1, 1)
    out = ops.color_adapt(emb, 0.5, gen(3))
    applied = [i for i in range(8) if not torch.equal(out[i], emb[i])]
    kept = [i for i in range(8) if torch.equal(out[i], emb[i])]
    assert applied and kept, "seed 3 must apply ColorAdapt to some samples and not to others"
    for i in applied:
        partner = emb[7 - i]  # the mirrored batch index
        torch.testing.assert_close(out[i].mean((1, 2)), partner.mean((1, 2)), atol=1e-4, rtol=0)
        torch.testing.assert_close(out[i].std((1, 2), unbiased=False), partner.std((1, 2), unbiased=False),
                                   atol=1e-3, rtol=1e-3)
        assert not torch.allclose(out[i].mean((1, 2)), emb[i].mean((1, 2)), atol=1e-2)
    # the choice is the seeded per-sample draw: same generator state, same samples
    assert applied == torch.nonzero(ops.choose(8, 0.5, gen(3), "cpu")).flatten().tolist()


def test_coloradapt_is_numerically_safe():
    emb = torch.randn(4, 8, 5, 5)
    emb[0, 3] = 2.5  # a constant channel: std 0
    out = ops.color_adapt(emb, 1.0, gen())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 3], torch.full((5, 5), emb[3, 3].mean().item()), atol=1e-5, rtol=0)
    one = torch.randn(3, 8, 1, 1)  # a 1x1 map: every channel constant
    assert torch.isfinite(ops.color_adapt(one, 1.0, gen())).all()


def test_emb_noise_only_on_chosen_samples_with_per_channel_offset():
    emb = torch.randn(16, 8, 4, 4)
    out = ops.emb_noise(emb, 0.5, offset_std=1.0, std=0.0, generator=gen(1))
    diff = out - emb
    changed = diff.abs().flatten(1).amax(1) > 0
    assert 0 < int(changed.sum()) < 16
    # offset only: one value per (sample, channel), shared by all positions
    torch.testing.assert_close(diff, diff[..., :1, :1].expand_as(diff))
    assert torch.equal(ops.emb_noise(emb, 0.0, 1.0, 1.0, gen()), emb)


def test_zero_fraction_changes_nothing():
    emb = torch.randn(5, 8, 4, 4)
    assert torch.equal(ops.color_adapt(emb, 0.0, gen()), emb)
    assert torch.equal(ops.emb_noise(emb, 0.0, 1.0, 1.0, gen()), emb)
    ids = torch.randint(0, 64, (5, 4, 4))
    none = torch.zeros(5, dtype=torch.bool)
    syn = ops.synonym_table(F.normalize(torch.randn(64, 8), dim=1), 3)
    assert torch.equal(ops.eda_replace(ids, syn, none, 1.0, gen()), ids)
    assert torch.equal(ops.eda_swap(ids, none, 0.5, gen()), ids)


# requantization


def test_requantize_maps_every_code_to_itself(codebook):
    v, c = codebook.shape
    as_map = codebook.t().reshape(1, c, v, 1)
    assert torch.equal(ops.requantize(as_map, codebook).flatten(), torch.arange(v))
    # and a codebook that is not l2-normalised (SeiT's) too: cosine lookup
    raw = torch.randn(100, 16) * torch.rand(100, 1) * 5
    assert torch.equal(ops.requantize(raw.t().reshape(1, 16, 10, 10), raw).flatten(), torch.arange(100))


def test_requantize_returns_valid_ids(codebook):
    emb = torch.randn(3, codebook.shape[1], 5, 7) * 10
    emb[0, :, 0, 0] = 0  # a zero vector too
    ids = ops.requantize(emb, codebook)
    assert ids.shape == (3, 5, 7) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < codebook.shape[0]
    # and it is the tokenizer's own rule
    from models.tokenizer import CosineQuantizer

    q = CosineQuantizer(codebook.shape[0], codebook.shape[1])
    q.codebook.copy_(codebook)
    assert torch.equal(q.lookup(emb[1:]), ids[1:])


# Token-EDA


def test_eda_replacement_only_produces_synonyms(codebook):
    syn = ops.synonym_table(codebook, 5)
    assert syn.shape == (codebook.shape[0], 5)
    assert not (syn == torch.arange(codebook.shape[0])[:, None]).any()  # never the code itself
    sims = F.normalize(codebook, dim=1) @ F.normalize(codebook, dim=1).t()
    sims.fill_diagonal_(-2)
    assert torch.equal(syn[:, 0], sims.argmax(1))  # most similar first
    ids = torch.randint(0, codebook.shape[0], (6, 8, 8))
    out = ops.eda_replace(ids, syn, torch.ones(6, dtype=torch.bool), 0.5, gen())
    changed = out != ids
    assert 0.3 < changed.float().mean() < 0.7
    assert (syn[ids[changed]] == out[changed][:, None]).any(1).all()


def test_pipeline_eda_ids_come_from_synonym_lists_or_the_sample(codebook):
    cfg = AugmentConfig(eda_replace_prob=0.5, eda_swap_prob=0.5, eda_swap_scale=0.5)
    aug = TokenAugment(cfg, codebook)
    ids = torch.randint(0, codebook.shape[0], (32, 8, 8))
    out, _ = aug(ids, None, gen(2))
    syn = aug.synonyms
    replaced = swapped = 0
    for a, b in zip(ids, out):
        if torch.equal(a, b):
            continue
        if torch.equal(torch.sort(a.flatten()).values, torch.sort(b.flatten()).values):
            swapped += 1  # a swap keeps the sample's multiset of ids
        else:
            replaced += 1
            d = a != b
            assert (syn[a[d]] == b[d][:, None]).any(1).all()
    assert replaced and swapped


def test_eda_swap_trades_two_disjoint_squares():
    ids = torch.arange(64).view(1, 8, 8).repeat(20, 1, 1)
    out = ops.eda_swap(ids, torch.ones(20, dtype=torch.bool), 0.5, gen(4))
    for a, b in zip(ids, out):
        moved = int((a != b).sum())
        side = int(round((moved / 2) ** 0.5))
        assert moved == 2 * side * side  # two ps x ps squares, nothing else
        assert torch.equal(torch.sort(b.flatten()).values, a.flatten())


# geometry


def test_flip_in_f_space_twice_is_identity():
    ta = models.create_model("tokenadapt_cifar", dim=32, depth=1, num_heads=2)
    emb = torch.randn(3, 32, 8, 8)
    feat = ta.f(emb).detach()
    assert feat.shape == (3, 32, 16, 16)
    theta = GeometrySpec(flip_prob=1.0).sample(3, gen())
    once = warp(feat, theta, (16, 16))
    torch.testing.assert_close(once, feat.flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(warp(once, theta, (16, 16)), feat, atol=1e-6, rtol=0)
    torch.testing.assert_close(flip_theta(3), theta)


def test_one_view_is_the_same_at_every_resolution():
    # a smooth function of position, warped at two resolutions, agrees (normalized coordinates)
    def ramp(n):
        c = (torch.arange(n) + 0.5) / n * 2 - 1
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        return torch.stack([xx, yy, xx * 0.5 + yy])[None].repeat(4, 1, 1, 1)

    theta = GeometrySpec(flip_prob=0.5, affine_prob=1.0, crop_prob=1.0, crop_scale=(0.3, 1)).sample(4, gen(5))
    # bilinear reproduces a linear function exactly (PyTorch's bicubic, a = -0.75, only nearly)
    small = warp(ramp(8), theta, (8, 8), mode="bilinear")
    big = warp(ramp(32), theta, (32, 32), mode="bilinear")
    pooled = F.avg_pool2d(big, 4)
    inside = small[:, :2].abs().amax(1) < 0.6  # sampled away from the borders
    assert int(inside.sum()) > 20
    torch.testing.assert_close(pooled.permute(0, 2, 3, 1)[inside], small.permute(0, 2, 3, 1)[inside],
                               atol=1e-4, rtol=0)


def test_geometry_draws_per_sample_and_validates():
    theta = GeometrySpec(flip_prob=0.5, crop_prob=1.0).sample(64, gen())
    flips = (theta[:, 0, 0] < 0).float().mean()
    assert 0.3 < flips < 0.7
    area = (theta[:, 0, 0].abs() * theta[:, 1, 1])
    assert float(area.min()) >= 0.08 - 1e-6 and float(area.max()) <= 1 + 1e-6
    with pytest.raises(ValueError, match="crop_scale"):
        GeometrySpec(crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="flip_prob"):
        GeometrySpec(flip_prob=1.5)


def test_center_crop_ids():
    ids = torch.arange(64).view(1, 8, 8)
    assert torch.equal(center_crop_ids(ids, 0), ids) and torch.equal(center_crop_ids(ids, 8), ids)
    assert torch.equal(center_crop_ids(ids, 6), ids[:, 1:7, 1:7])
    with pytest.raises(ValueError, match="out_size 9"):
        center_crop_ids(ids, 9)


# the pipeline


def everything_on(**kw):
    return AugmentConfig(**{"eda_replace_prob": 0.25, "eda_swap_prob": 0.25, "noise_prob": 0.5,
                            "coloradapt_prob": 0.5, "rrc_prob": 1.0, "flip_prob": 0.5, "tokenadapt": True,
                            "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1, "num_classes": 10, **kw})


def test_same_seed_same_output_and_other_seed_differs(codebook):
    aug = build_token_augment(everything_on(), codebook)
    ids = torch.randint(0, codebook.shape[0], (12, 8, 8))
    labels = torch.randint(0, 10, (12,))
    a = aug(ids, labels, gen(7))
    b = aug(ids, labels, gen(7))
    c = aug(ids, labels, gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (12, 8, 8) and a[0].dtype == torch.long
    assert int(a[0].min()) >= 0 and int(a[0].max()) < codebook.shape[0]
    torch.testing.assert_close(a[1].sum(1), torch.ones(12))
    assert float(a[1].min()) >= 0.1 / 10 - 1e-6  # smoothed


def test_batch_of_one_and_no_labels(codebook):
    aug = build_token_augment(everything_on(out_size=6), codebook)
    out, t = aug(torch.randint(0, 512, (1, 8, 8)), torch.tensor([3]), gen())
    assert out.shape == (1, 6, 6) and t.shape == (1, 10) and abs(float(t[0, 3]) - 0.91) < 1e-6
    ids = torch.randint(0, 512, (5, 8, 8))
    out, t = aug(ids, None, gen())  # no labels (MTM): no mixing, targets stay None
    assert out.shape == (5, 6, 6) and t is None
    empty, _ = aug(ids[:0], None, gen())
    assert empty.shape == (0, 6, 6)


def test_defaults_are_off_and_colour_alone_keeps_ids_when_fraction_is_zero(codebook):
    ids = torch.randint(0, 512, (6, 8, 8))
    labels = torch.arange(6)
    out, t = TokenAugment(AugmentConfig(), codebook)(ids, labels, gen())
    assert torch.equal(out, ids) and t is labels
    cfg = AugmentConfig(noise_prob=0.5, coloradapt_prob=0.5, noise_fraction=0.0, coloradapt_fraction=0.0)
    assert torch.equal(TokenAugment(cfg, codebook)(ids, None, gen())[0], ids)
    cfg = AugmentConfig(noise_prob=1.0, noise_fraction=1.0, noise_std=0.5)
    assert not torch.equal(TokenAugment(cfg, codebook)(ids, None, gen())[0], ids)


def test_tokenadapt_half_is_the_second_half(codebook):
    ta = models.create_model("tokenadapt_cifar", dim=32, depth=1, num_heads=2)
    cfg = AugmentConfig(tokenadapt=True)  # base half: no geometry, so untouched
    ids = torch.randint(0, 512, (7, 8, 8))
    out, _ = TokenAugment(cfg, codebook, ta)(ids, None, gen())
    assert torch.equal(out[:4], ids[:4])  # B - B//2 = 4 base samples first
    assert not torch.equal(out[4:], ids[4:])  # an untrained TokenAdapt changes its half


def test_config_errors_name_the_field(codebook):
    with pytest.raises(ValueError, match="noise_prob"):
        AugmentConfig(noise_prob=0.8, coloradapt_prob=0.5)
    with pytest.raises(ValueError, match="num_classes"):
        AugmentConfig(cutmix_alpha=1.0)
    with pytest.raises(ValueError, match="mixup_alpha needs tokenadapt"):
        AugmentConfig(mixup_alpha=0.8, num_classes=10)
    with pytest.raises(ValueError, match="no TokenAdapt model"):
        TokenAugment(AugmentConfig(tokenadapt=True), codebook, None)
    small = models.create_model("tokenadapt_cifar", vocab_size=100, dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="100 codes"):
        TokenAugment(AugmentConfig(tokenadapt=True), codebook, small)


def test_pipeline_moves_to_a_device_with_its_buffers(codebook):
    aug = build_token_augment(everything_on(), codebook)
    names = {n for n, _ in aug.named_buffers()}
    assert {"codebook", "synonyms"} <= names
    assert all(not p.requires_grad for p in aug.parameters())
    aug.train()
    assert not aug.tokenadapt.training


# the shipped TokenAdapt: at least 1.5x the naive agreement for flip and crop


def _beats_naive(tokenizer, pixels):
    """The shipped TokenAdapt's agreement on ``pixels`` is at least 1.5x the naive one for flip and crop."""
    from tokray.augment.tokenadapt import load_tokenadapt
    from tokray.eval.agreement import EVAL_VIEWS, agreement

    model, info = tokenizer
    ta, ta_info = load_tokenadapt("", info["fingerprint"])
    views = {k: EVAL_VIEWS[k] for k in ("flip", "crop", "affine")}
    res = agreement(model, ta, pixels, views, psnr=False)
    for view in ("flip", "crop"):
        assert res[view]["tokenadapt"] >= 1.5 * res[view]["naive"], res
    return ta_info


@pytest.mark.skipif(not CIFAR_TAR.exists(), reason="needs ../shared/datasets/cifar10-train.tar")
def test_shipped_tokenadapt_beats_naive_on_held_out_images(tokenizer):
    from tokray.data.images import ImageSource, decode_many
    from tokray.data.splits import split_indices

    src = ImageSource(str(CIFAR_TAR))  # the fixed validation split's real images
    idx = split_indices(src.labels, "val")[::20]  # 250 of the 5,000, every class
    _beats_naive(tokenizer, decode_many(src, idx, 32)[0])


def test_shipped_tokenadapt_beats_naive_on_decoded_validation_tokens(tokenizer):
    """A fresh checkout (no images): the shipped validation tokens, decoded, stand in for the images."""
    from tokray.assets import default_tokens
    from tokray.storage.dataset import open_dataset

    model, _ = tokenizer
    batch = next(open_dataset(default_tokens("val")).iter_batches(5000))["ids"][::20]
    ids = torch.from_numpy(batch.astype(np.int64))
    with torch.no_grad():
        pixels = ((model.decode(ids) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    ta_info = _beats_naive(tokenizer, pixels)
    # the figures measured on the whole validation split when the weights were made
    final = ta_info["extra"]["agreement"]
    for view in ("flip", "crop"):
        assert final[view]["tokenadapt"] >= 1.5 * final[view]["naive"], final
