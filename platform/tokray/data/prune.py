"""Prune a token dataset's codebook to the codes its ids use, for any tokenizer (SeiT keeps 391 of
ViT-VQGAN's 8192 codes).

``prune_dataset(SRC, DST)`` counts the ids of every shard, keeps the used codes (ascending base id),
and writes DST with the same shards (same rows, labels and sample ids) holding ids remapped to
0..K-1, ``codebook_size`` K and a new tokenizer fingerprint (``pruned_fingerprint`` of the base
fingerprint and the kept codes). Beside the shards DST carries ``codebook.safetensors`` (the K kept
code vectors, what training and token augmentation read) and ``prune_map.json`` (``keep``: the base
code of each new id, ``base_tokenizer``), so ``load_tokenizer(BASE, for_dataset=DST)`` decodes the
remapped ids exactly as BASE decodes the original ones, and encodes new images to the nearest kept
code. A SeiT import carries its codebook and needs no tokenizer; any other dataset needs the
tokenizer that made it (for its code vectors). Pruning a pruned dataset composes the maps.
"""

from __future__ import annotations

import logging

import numpy as np

from tokray.data.seit_import import CODEBOOK_FILE
from tokray.data.tokenizer import (PRUNE_MAP_FILE, load_tokenizer, prune_map_bytes, pruned_fingerprint,
                                   read_prune_map)
from tokray.storage.dataset import DatasetWriter, manifest_digest, open_dataset
from tokray.storage.formats.tokens import TokenMeta, table_ids
from tokray.storage.stores import same_location
from tokray.storage.uri import parse_uri

log = logging.getLogger(__name__)


def code_counts(ds) -> np.ndarray:
    """How often each code occurs in a token dataset: int64 [codebook_size]."""
    counts = np.zeros(ds.meta.codebook_size, np.int64)
    for i in range(len(ds.manifest.shards)):
        counts += np.bincount(table_ids(ds.read_shard(i, ["ids"])).reshape(-1), minlength=len(counts))
    return counts


def _codebook_of(ds, tokenizer: str | None):
    """The code vectors [V, C] behind ``ds``'s ids: its own codebook file, else its tokenizer's."""
    import safetensors.torch

    if CODEBOOK_FILE in ds.manifest.files:
        return safetensors.torch.load(ds.read_file(CODEBOOK_FILE))["codebook"].float()
    if not tokenizer:
        raise ValueError(f"{ds.uri} carries no {CODEBOOK_FILE}: give the tokenizer that made it (--tokenizer, "
                         f"fingerprint {ds.meta.tokenizer}) so that the pruned codebook can be stored with it")
    tok, _ = load_tokenizer(tokenizer, for_dataset=ds)  # refuses another tokenizer, naming both
    return tok.codebook.detach().float().cpu()


def prune_dataset(src, dst, tokenizer: str | None = None, overwrite: bool = False, progress=None) -> dict:
    """Write ``src`` to ``dst`` with its ids remapped to the codes it uses (see the module doc); returns
    the counts, the kept codes and the store bytes before and after. Resumable like any dataset write."""
    import safetensors.torch

    ds = open_dataset(src)
    if ds.manifest.kind != "tokens":
        raise ValueError(f"prune: {ds.uri} is a {ds.manifest.kind} dataset; only token datasets have a codebook")
    if same_location(parse_uri(src), parse_uri(dst)):
        raise ValueError(f"prune: DST must differ from SRC ({ds.uri}); the source is read while DST is written")
    codebook = _codebook_of(ds, tokenizer)
    counts = code_counts(ds)
    used = np.flatnonzero(counts)
    keep = used
    if len(used) < 2:  # a codebook holds at least 2 codes (TokenMeta: 2..65536)
        keep = np.union1d(used, np.setdiff1d(np.arange(len(counts)), used)[: 2 - len(used)])
    lut = np.full(len(counts), np.iinfo(np.uint16).max, np.uint16)
    lut[keep] = np.arange(len(keep), dtype=np.uint16)
    pm = read_prune_map(ds)  # pruning a pruned dataset composes the maps
    base_fp = pm["base_tokenizer"] if pm else ds.meta.tokenizer
    base_size = pm["base_codebook_size"] if pm else ds.meta.codebook_size
    base_keep = np.asarray(pm["keep"], np.int64)[keep] if pm else keep
    fp = pruned_fingerprint(base_fp, base_keep)
    meta = ds.meta
    extra = {**meta.extra, "pruned": {"base_tokenizer": base_fp, "base_codebook_size": int(base_size),
                                      "codes": int(len(keep)), "source_codebook_size": int(meta.codebook_size)}}
    new_meta = TokenMeta(grid=meta.grid, codebook_size=int(len(keep)), class_names=meta.class_names, tokenizer=fp,
                         shard_rows=meta.shard_rows, extra=extra)
    with DatasetWriter(dst, new_meta, overwrite=overwrite, source=manifest_digest(ds)) as writer:
        for name in ds.manifest.files:  # other side files travel along; the codebook and map are new
            if name not in (CODEBOOK_FILE, PRUNE_MAP_FILE):
                writer.add_file(name, ds.read_file(name))
        pruned = codebook[keep].contiguous()
        writer.add_file(CODEBOOK_FILE, safetensors.torch.save({"codebook": pruned}))
        writer.add_file(PRUNE_MAP_FILE, prune_map_bytes(base_fp, base_size, base_keep, fp))
        for i in range(len(ds.manifest.shards)):
            if not writer.shard_done(i):
                b = ds.format.to_numpy(meta, ds.read_shard(i))
                writer.write_shard(i, lut[b["ids"]], b["label"], b["sample_id"])
            if progress:
                progress(1)
        manifest = writer.close(num_shards=len(ds.manifest.shards))
    log.info("pruned %s: %d of %d codes used; wrote %s (tokenizer %s)", ds.uri, len(used), len(counts), dst, fp)
    return {"src": ds.uri, "dst": str(dst), "codes_before": int(len(counts)), "codes_used": int(len(used)),
            "codebook_size": int(len(keep)), "tokenizer": fp, "base_tokenizer": base_fp,
            "num_samples": manifest.num_samples, "store_bytes_before": ds.manifest.store_bytes,
            "store_bytes": manifest.store_bytes, "codebook_dims": int(codebook.shape[1])}


def add_command(sub, report) -> None:
    """Register ``prune SRC DST`` on ``sub`` (argparse subparsers of jobs/dataset.py); ``report(rows, result)``
    prints the table and the JSON line and returns the exit code."""
    s = sub.add_parser("prune", help="keep only the codes a token dataset uses: ids remapped to 0..K-1, the map and "
                                     "the pruned codebook stored with it (resumable)",
                       description="Writes DST with the same shards as SRC, ids remapped to the K codes used, "
                                   "codebook_size K, codebook.safetensors (the K code vectors) and prune_map.json "
                                   "(the original code of each id). Decode stays exact through "
                                   "load_tokenizer(TOKENIZER, for_dataset=DST).")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--tokenizer", help="the tokenizer that made SRC (PATH.safetensors or diffusers:PATH), for its code "
                                       "vectors; not needed when SRC carries codebook.safetensors (a SeiT import)")
    s.add_argument("--overwrite", action="store_true", help="replace whatever is at DST (a dataset or an interrupted write)")

    def run(args) -> int:
        res = prune_dataset(args.src, args.dst, tokenizer=args.tokenizer, overwrite=args.overwrite)
        rows = [{k: res[k] for k in ("codes_before", "codes_used", "codebook_size", "num_samples",
                                     "store_bytes_before", "store_bytes")}]
        return report(rows, res)

    s.set_defaults(fn=run)
