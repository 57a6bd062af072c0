"""Token agreement of augmented tokens: the paper's Figure 3 question (SeiT++), answered with numbers.

For a view A, the share of token positions where the augmented tokens equal tokenizer(A(x)), for
(a) naive augmentation of the embedding grid + cosine requantization and (b) TokenAdapt; plus the
PSNR of the decoded tokens against A(x), and of tokenizer(A(x)) itself (the ceiling).
"""

from __future__ import annotations

import numpy as np
import torch

from tokray.augment.geometry import GeometrySpec, warp
from tokray.augment.ops import embed, requantize
from tokray.augment.tokenadapt import tokenadapt_logits
from tokray.data.tokenizer import to_unit
from tokray.eval.metrics import psnr_from_sse, squared_error_255

# the views the agreement is reported for (fixed: every number in a table means the same thing)
EVAL_VIEWS = {
    "identity": GeometrySpec(),
    "flip": GeometrySpec(flip_prob=1.0),
    "crop": GeometrySpec(crop_prob=1.0, crop_scale=(0.08, 1.0)),
    "affine": GeometrySpec(affine_prob=1.0),
}


@torch.no_grad()
def agreement(tokenizer, tokenadapt, pixels: np.ndarray, views: dict[str, GeometrySpec] | None = None,
              seed: int = 0, batch: int = 500, psnr: bool = True) -> dict:
    """Per view: token agreement with tokenizer(A(x)) of naive grid augmentation + requantization
    and of TokenAdapt, and (``psnr``) the PSNR of their decoded tokens and of tokenizer(A(x))
    against A(x). The views are drawn from ``seed``, identically for both methods."""
    views = EVAL_VIEWS if views is None else views
    was_training = tokenadapt.training
    tokenadapt.eval()
    codebook = tokenizer.quantizer.codebook
    size = (tokenizer.image_size, tokenizer.image_size)
    grid = tokenizer.grid
    out = {}
    for k, (name, spec) in enumerate(views.items()):
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        hits = {"naive": 0, "tokenadapt": 0}
        err = {"naive": 0.0, "tokenadapt": 0.0, "tokenizer": 0.0}
        n_tok = n_px = 0
        for s in range(0, len(pixels), batch):
            x = to_unit(pixels[s:s + batch])
            theta = spec.sample(len(x), gen)
            xa = warp(x, theta, size).clamp(-1, 1)
            target = tokenizer.encode(xa)
            emb = embed(tokenizer.encode(x), codebook)
            ids = {"naive": requantize(warp(emb, theta, grid), codebook),
                   "tokenadapt": tokenadapt_logits(tokenadapt, emb, theta, grid).argmax(1)}
            for m, v in ids.items():
                hits[m] += int((v == target).sum())
                if psnr:
                    err[m] += squared_error_255(tokenizer.decode(v), xa)
            if psnr:
                err["tokenizer"] += squared_error_255(tokenizer.decode(target), xa)
            n_tok += target.numel()
            n_px += xa.numel()
        row = {m: hits[m] / max(1, n_tok) for m in hits}
        if psnr:
            row.update({f"{m}_psnr_db": psnr_from_sse(e, n_px) for m, e in err.items()})
        out[name] = row
    tokenadapt.train(was_training)
    return out
