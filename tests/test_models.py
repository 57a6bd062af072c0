"""Every registered model builds from arguments alone and runs forward and backward on CPU."""

import pytest
import torch

from models import create_model, list_models


def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError) as e:
        create_model("vit_giant_nope")
    for name in list_models():
        assert name in str(e.value)


@pytest.mark.parametrize("name", [n for n in list_models() if n.startswith("token_vit")])
def test_token_vit_forward_backward(name):
    grid, vocab = ((8, 8), 300) if name.endswith("tiny") else ((4, 4), 50)
    kw = {} if name.endswith("tiny") else {"depth": 1}  # the big ones: one block is enough to test
    model = create_model(name, grid=grid, vocab_size=vocab, num_classes=10, **kw)
    ids = torch.randint(0, vocab, (3, *grid), dtype=torch.int32).to(torch.uint16)
    logits = model(ids)
    assert logits.shape == (3, 10)
    logits.sum().backward()
    assert model.patch_embed.embed.weight.grad is not None


def test_token_vit_rejects_a_grid_it_was_not_built_for():
    model = create_model("token_vit_tiny", grid=(8, 8), vocab_size=64, num_classes=2)
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(8, 8\)"):
        model(torch.zeros(1, 4, 4, dtype=torch.long))
