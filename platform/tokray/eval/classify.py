"""Top-1 of a fine-tuned checkpoint: on a token dataset, or on raw images (optionally corrupted)
tokenized on the fly with the tokenizer of the checkpoint's training data, or (a pixel-baseline
checkpoint) stored the way its training images were. Used by jobs/evaluate.py and the sweep.

The checkpoint's DataSpec decides what fits; its task (tokray.train.tasks) builds the model and
gives the evaluation view (tokens: the central crop of the training view's size)."""

from __future__ import annotations

import logging

from tokray.data.spec import DataSpec

log = logging.getLogger(__name__)


def load_classifier(path: str, use_ema: bool):
    """(model in eval mode, its task, the DataSpec of its training data) from a fine-tuning checkpoint."""
    from tokray.train.checkpoint import load_state, resolve_checkpoint
    from tokray.train.tasks import make_task

    state, cfg, spec = load_state(path)
    if cfg.task != "classify":
        raise ValueError(f"checkpoint {resolve_checkpoint(path)} is a {cfg.task} checkpoint of {cfg.model}, not a "
                         f"classifier; fine-tune it first: python jobs/finetune.py --init {path}")
    if use_ema and "ema" not in state:
        raise ValueError(f"--ema: checkpoint {resolve_checkpoint(path)} holds no EMA weights (its run had ema_decay 0)")
    task = make_task(cfg, spec, augment=False)
    model = task.build()  # the weights (codebook stem too) come from the file
    model.load_state_dict(state["ema" if use_ema else "model"])
    return model.eval(), task, spec


def token_batches(uri: str, spec: DataSpec, ckpt: str, batch_size: int, limit: int):
    """Batches of a token dataset that fits the checkpoint (grid, vocabulary, classes)."""
    import torch

    from tokray.data.splits import stratified_sample
    from tokray.storage.dataset import open_dataset
    from tokray.train.checkpoint import require_fits_data

    ds = open_dataset(uri)
    have = DataSpec.from_manifest(ds.manifest)
    require_fits_data(spec, have, ckpt, uri)
    _require_same_classes(have.class_names, spec.class_names, uri, ckpt)
    keep = stratified_sample(ds.labels(), limit) if limit else None
    offset = 0
    for b in ds.iter_batches(batch_size):
        rows = slice(None) if keep is None else keep[(keep >= offset) & (keep < offset + len(b["label"]))] - offset
        offset += len(b["label"])
        if keep is None or len(rows):
            yield {"ids": torch.from_numpy(b["ids"][rows].astype("int64")),
                   "label": torch.from_numpy(b["label"][rows].astype("int64"))}


def image_batches(src_uri: str, split: str, tokenizer_path: str, spec: DataSpec, ckpt: str, batch_size: int,
                  limit: int, device, transform=None, data_uri: str = ""):
    """Decode raw images, ``transform`` them (uint8 [n, H, W, 3] -> same; e.g. a corruption), tokenize them
    with the checkpoint data's tokenizer, yield id batches."""
    import torch

    from tokray.data.tokenizer import load_tokenizer, to_unit

    tokenizer, info = load_tokenizer(tokenizer_path)
    if info["fingerprint"] != spec.tokenizer and data_uri:  # pruned training data: its map gives the ids
        tokenizer, info = load_tokenizer(tokenizer_path, for_dataset=data_uri)
    if info["fingerprint"] != spec.tokenizer:  # ids mean nothing under another tokenizer
        raise ValueError(f"checkpoint {ckpt} was trained on tokens of tokenizer {spec.tokenizer}, but "
                         f"{tokenizer_path} is tokenizer {info['fingerprint']}; pass the training data's --tokenizer")
    tokenizer.to(device)
    for pixels, labels in raw_images(src_uri, split, spec.class_names, ckpt, batch_size, limit,
                                     tokenizer.image_size, transform):
        with torch.no_grad():
            ids = tokenizer.encode(to_unit(pixels).to(device)).cpu()
        yield {"ids": ids, "label": labels}


def stored_pixel_batches(src_uri: str, split: str, spec: DataSpec, ckpt: str, batch_size: int, limit: int,
                         transform=None, raw_size: int = 32):
    """For a pixel-baseline checkpoint: raw images (``transform``ed, e.g. corrupted), then stored the way its
    training data was (resized, JPEG at its quality) and decoded, as uint8 [B, 3, s, s]."""
    import torch

    from tokray.storage.formats.pixels import decode_jpegs, encode_jpeg

    size = spec.image_size
    # corrupted at full resolution, then stored
    for pixels, labels in raw_images(src_uri, split, spec.class_names, ckpt, batch_size, limit, raw_size, transform):
        stored = decode_jpegs([encode_jpeg(_resize(p, size), spec.quality) for p in pixels], size)
        yield {"pixels": torch.from_numpy(stored).permute(0, 3, 1, 2).contiguous(), "label": labels}


def raw_images(src_uri: str, split: str, class_names: tuple, ckpt: str, batch_size: int, limit: int, size: int,
               transform=None):
    """(uint8 pixels [n, size, size, 3], int64 labels) chunks of a split of raw images, ``transform``ed."""
    import torch

    from tokray.data.images import ImageSource, decode_many, iter_indices
    from tokray.data.splits import split_indices, stratified_sample

    src = ImageSource(src_uri)
    _require_same_classes(src.class_names, class_names, src_uri, ckpt)
    idx = split_indices(src.labels, split)
    if limit:
        idx = idx[stratified_sample(src.labels[idx], limit)]
    for chunk in iter_indices(len(idx), batch_size):
        pixels, kept, _ = decode_many(src, idx[chunk.start:chunk.stop], size)
        yield (transform(pixels) if transform is not None else pixels), torch.from_numpy(src.labels[kept].astype("int64"))


def _resize(pixels, size: int):
    import numpy as np
    from PIL import Image

    if pixels.shape[0] == size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC), dtype=np.uint8)


def _require_same_classes(have, want, where: str, ckpt: str) -> None:
    have, want = list(have), list(want)
    if have != want:
        raise ValueError(f"{where} has classes {have[:4]}{'...' if len(have) > 4 else ''} ({len(have)}), but checkpoint "
                         f"{ckpt} was trained on {want[:4]}{'...' if len(want) > 4 else ''} ({len(want)})")


def evaluate_checkpoint(ckpt: str, *, data: str = "", images: str = "", split: str = "val", tokenizer: str = "",
                        ema: bool = False, batch_size: int = 500, limit: int = 0, transform=None, device=None) -> dict:
    """Top-1 (%) of a classifier checkpoint on tokens (``data``; default the embedded validation split) or on
    raw ``images`` tokenized on the fly (``transform`` applied to the pixels first)."""
    import time

    import torch

    from tokray.assets import default_tokenizer, default_tokens
    from tokray.devices import local_device
    from tokray.train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(ckpt)
    device = device or local_device()
    model, task, spec = load_classifier(ckpt, ema)
    cfg = task.cfg
    model.to(device)
    if not spec.is_tokens:
        if not images:
            raise ValueError(f"{ckpt} is a pixel-baseline checkpoint; evaluate it on raw --images")
        source = images
        batches = stored_pixel_batches(images, split, spec, ckpt, batch_size, limit, transform)
    elif images:
        source = images
        batches = image_batches(images, split, tokenizer or default_tokenizer(), spec, ckpt, batch_size, limit, device,
                                transform, data_uri=cfg.data or default_tokens("train"))
    else:
        source = data or default_tokens("val")
        batches = token_batches(source, spec, ckpt, batch_size, limit)
    t0 = time.perf_counter()
    with torch.no_grad():
        correct, seen = task.top1(model, batches, device)  # tokens: the central crop if trained on crops
    if seen == 0:
        raise ValueError(f"{source} gave no samples to evaluate")
    return {"checkpoint": ckpt, "source": source, "input": "images" if images else "tokens",
            "weights": "ema" if ema else "model", "samples": seen, "top1": 100.0 * correct / seen,
            "samples_per_s": seen / (time.perf_counter() - t0), "model": cfg.model, "recipe": cfg.recipe,
            "device": str(device)}
