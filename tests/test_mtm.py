"""MTM masking and loss: ratios in range, dropped within masked, loss on masked tokens only, learns."""

import math

import pytest
import torch

from models import create_model
from models.mtm import truncated_normal


def _model(**kw):
    torch.manual_seed(0)
    return create_model("mtm_tiny", grid=(8, 8), vocab_size=64, embed_dim=64, depth=2, decoder_dim=32,
                        decoder_depth=1, token_dropout=0.0, **kw)


def test_ratios_stay_in_range_and_follow_the_seed():
    g = torch.Generator().manual_seed(0)
    draws = [truncated_normal(0.45, 0.25, 0.4, 1.0, g) for _ in range(2000)]
    assert min(draws) >= 0.4 and max(draws) <= 1.0
    assert 0.55 < sum(draws) / len(draws) < 0.7  # a normal(0.45, 0.25) truncated to [0.4, 1] has mean ~0.61
    g2 = torch.Generator().manual_seed(0)
    assert draws[:5] == [truncated_normal(0.45, 0.25, 0.4, 1.0, g2) for _ in range(5)]


@pytest.mark.parametrize("seed", range(5))
def test_dropped_is_a_subset_of_masked_with_the_right_counts(seed):
    model = _model()
    ratio, masked, dropped = model.sample_masks(6, "cpu", torch.Generator().manual_seed(seed))
    assert 0.4 <= ratio <= 1.0
    assert (dropped <= masked).all()
    n = model.num_patches
    assert (masked.sum(1) == math.ceil(n * ratio)).all()  # one ratio for the whole batch
    assert (dropped.sum(1) == math.ceil(n * 0.4)).all()  # ceil(N * r_min) dropped in every sample
    assert not torch.equal(masked[0], masked[1])  # but each sample its own positions


def test_loss_sees_masked_positions_only():
    model = _model()
    ids = torch.randint(0, 64, (4, 8, 8))
    out = model(ids, generator=torch.Generator().manual_seed(1))
    out["logits"].retain_grad()
    out["loss"].backward()
    grad = out["logits"].grad.abs().sum(-1)  # [B, H, W]
    assert (grad[~out["token_mask"]] == 0).all()
    assert (grad[out["token_mask"]] > 0).all()


def test_loss_falls_on_a_fixed_tiny_batch():
    model = _model()
    ids = torch.randint(0, 64, (1, 8, 8)).expand(8, -1, -1).clone()  # one token map, 8 maskings of it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss = model(ids, generator=g)["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses  # measured: 4.09 -> 2.75


def test_encoder_loads_strictly_into_the_finetune_model():
    mtm = _model()
    vit = create_model("token_vit_tiny", grid=(8, 8), vocab_size=64, embed_dim=64, depth=2, num_classes=10)
    missing, unexpected = vit.load_state_dict(mtm.encoder.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == ["head.bias", "head.weight"]
