"""Tokenizers: what turns images into the ids a token dataset stores, and ids back into images.

One protocol (``Tokenizer``), three implementations and one view, one resolver:

- ``TokrayVQ``: tokray's conv VQ tokenizer, one safetensors artifact (``tokray.artifacts``) whose
  metadata holds its config and fingerprint (``jobs/train_tokenizer.py`` makes one).
- ``DiffusersVQ``: any diffusers ``VQModel`` (taming/LDM VQGANs and the like): a ``save_pretrained``
  folder (or a pipeline folder with a ``vqvae/`` subfolder), or a config plus a weights file.
- ``CodebookOnly``: the codebook a token dataset carries (SeiT imports keep only SeiT's codebook;
  pruned datasets keep theirs): enough to train and augment on the stored ids, not to encode or
  decode images (``TokenizerUnavailable`` says so, naming what to pass instead).
- ``PrunedTokenizer``: a tokenizer seen through a dataset's prune map (ids remapped to the K codes
  the dataset uses, ``tokray.data.prune``): encodes to the nearest kept code, decodes exactly as
  the full tokenizer decodes the original ids.

``load_tokenizer(spec)`` takes ``PATH.safetensors`` (tokray), ``diffusers:PATH`` (options after a
``?``: ``size=256``, ``norm=pm1|01|imagenet``, ``weights=FILE.safetensors``) or
``codebook:DATASET_URI``; ``for_dataset=`` returns the tokenizer whose ids that dataset holds
(the pruned view when the dataset was pruned from it) and refuses any other one.

Pixels cross the protocol as tokray's unit range: float [N, 3, H, W] in [-1, 1] (``to_unit`` of
uint8); each tokenizer maps that to its own input normalisation (``mean``/``std`` on [0, 1]).

The fingerprint is what every token dataset records, so ids are never read with another codebook
(``require_same_tokenizer``). It hashes the config and the stored weights' raw bytes (bf16 too)
and is computed once when the weights are read: moving a tokenizer to a GPU or computing in bf16
(``to(device, dtype)``, autocast; the nearest-code search stays float32) does not change it.
Training lives in ``tokray.fit.tokenizer``.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import types
from typing import ClassVar
from urllib.parse import parse_qsl

import numpy as np
import torch
import torch.nn.functional as F

import models
from tokray.artifacts import factory_args, fingerprint as artifact_fingerprint, load_artifact, save_artifact
from tokray.data.seit_import import CODEBOOK_FILE

log = logging.getLogger(__name__)

MAKE_ONE = "train one with `python jobs/train_tokenizer.py`"
SPEC_FORMS = ("PATH.safetensors (a tokray tokenizer), diffusers:PATH (a diffusers VQModel save_pretrained folder; "
              "diffusers:CONFIG.json?weights=FILE.safetensors for a config plus weights; options ?size=N&norm=pm1|01|"
              "imagenet), or codebook:DATASET_URI (the codebook a token dataset carries: SeiT imports, pruned datasets)")
PRUNE_MAP_FILE = "prune_map.json"  # written by tokray.data.prune, beside the pruned codebook
NORMS = {"pm1": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [-1, 1]: tokray, taming, LDM, diffusers VQModel
         "01": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
         "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
_UNIT = NORMS["pm1"]


class TokenizerUnavailable(ValueError):
    """The tokenizer cannot do what was asked (a codebook-only tokenizer encodes and decodes nothing)."""


class Tokenizer(abc.ABC):
    """Images <-> ids, and the codebook behind the ids.

    Attributes: ``kind`` ("tokray", "diffusers", "codebook", "pruned"), ``spec`` (what loads it),
    ``fingerprint`` (16 hex digits, or "seit-codebook:..." for SeiT imports), ``grid`` (h, w),
    ``image_size`` (side of the square input; None when it cannot encode), ``codebook_size``,
    ``mean``/``std`` (its input normalisation on [0, 1] pixels), ``can_encode``/``can_decode``,
    ``device``, ``dtype`` (compute dtype: float32, or bf16 under autocast), ``config``, ``extra``.
    """

    kind: ClassVar[str]
    can_encode: ClassVar[bool] = True
    can_decode: ClassVar[bool] = True

    def __init__(self, spec: str, fingerprint: str, grid, image_size: int | None, config: dict,
                 extra: dict | None = None, mean=_UNIT[0], std=_UNIT[1]):
        self.spec, self.fingerprint = spec, fingerprint
        self.grid = (int(grid[0]), int(grid[1]))
        self.image_size = image_size
        self.config, self.extra = config, extra or {}
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    # -- what every tokenizer has ------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def codebook(self) -> torch.Tensor:
        """The code vectors [V, C] the ids index (float32, on ``device``)."""

    @property
    def codebook_size(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def num_parameters(self) -> int:
        return int(self.codebook.numel())

    @property
    def info(self) -> dict:
        """What ``load_tokenizer`` returns beside the tokenizer (the old artifact-info shape, and more)."""
        return {"fingerprint": self.fingerprint, "config": self.config, "extra": self.extra, "kind": self.kind,
                "spec": self.spec}

    @property
    def quantizer(self):
        """``tokenizer.quantizer.codebook``, for code written against the conv VQ module; use ``codebook``."""
        return types.SimpleNamespace(codebook=self.codebook)

    def describe(self) -> str:
        size = f"{self.image_size}x{self.image_size} -> " if self.image_size else ""
        return (f"{self.kind} tokenizer {self.spec} ({self.num_parameters / 1e6:.2f} M parameters, {size}"
                f"{self.grid[0]}x{self.grid[1]} ids, {self.codebook_size} codes, fingerprint {self.fingerprint})")

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Tokenizer":
        """Move to ``device``; ``dtype`` bf16/fp16 runs the networks under autocast (weights and the
        nearest-code search stay float32). Returns self."""
        if device is not None:
            self.device = torch.device(device)
            self._move(self.device)
        if dtype is not None:
            self.dtype = dtype
        return self

    def dataset_files(self) -> dict[str, bytes]:
        """Side files every dataset this tokenizer writes carries (a pruned view: its codebook and map)."""
        return {}

    # -- pixels <-> ids ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels float [N, 3, H, W] in [-1, 1] -> ids int64 [N, h, w] (on ``device``)."""
        return self.lookup(self.features(x))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> the encodings [N, C, h, w] (float32) that ``lookup`` quantizes."""
        self._require("encode", self.can_encode)
        x = x.to(self.device, non_blocking=True)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"{self.spec} encodes {self.image_size}x{self.image_size} images, got "
                             f"{tuple(x.shape[-2:])}; decode the source at its image_size")
        with self._autocast():
            return self._features(self._to_input(x)).float()

    @torch.no_grad()
    def lookup(self, z: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """The tokenizer's own nearest-code rule: encodings [N, C, h, w] -> ids [N, h, w]; with ``codes``
        (int64 [K]) only those codes compete and the result indexes ``codes``."""
        self._require("encode", self.can_encode)
        return self._lookup(z.float(), codes)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, h, w] -> pixels float [N, 3, H, W] in [-1, 1] (on ``device``)."""
        self._require("decode", self.can_decode)
        ids = torch.as_tensor(ids).to(self.device).long()
        with self._autocast():
            out = self._decode(ids).float()
        return self._from_output(out).clamp(-1, 1)

    def encode_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 pixels [N, H, W, 3] -> uint16 ids [N, h, w] (numpy, CPU)."""
        x = to_unit(pixels).to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return self.encode(x).to(torch.int32).cpu().numpy().astype(np.uint16)

    def decode_pixels(self, ids) -> np.ndarray:
        """ids [N, h, w] -> uint8 pixels [N, H, W, 3] (numpy, CPU)."""
        y = self.decode(torch.as_tensor(ids).long())
        return ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    # -- what implementations provide --------------------------------------------------------------

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise TokenizerUnavailable(self._unavailable("encode"))

    def _lookup(self, z: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        raise TokenizerUnavailable(self._unavailable("encode"))

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        raise TokenizerUnavailable(self._unavailable("decode"))

    def _move(self, device: torch.device) -> None:
        pass

    # -- helpers -----------------------------------------------------------------------------------

    def _require(self, what: str, ok: bool) -> None:
        if not ok:
            raise TokenizerUnavailable(self._unavailable(what))

    def _unavailable(self, what: str) -> str:
        return f"{self.describe()} cannot {what}"

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _to_input(self, x: torch.Tensor) -> torch.Tensor:
        if (self.mean, self.std) == _UNIT:
            return x
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x + 1) / 2 - mean) / std

    def _from_output(self, y: torch.Tensor) -> torch.Tensor:
        if (self.mean, self.std) == _UNIT:
            return y
        mean = torch.tensor(self.mean, device=y.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=y.device).view(1, 3, 1, 1)
        return (y * std + mean) * 2 - 1


# -- tokray's conv VQ ---------------------------------------------------------------------------


class _NetworkTokenizer(Tokenizer):
    """A tokenizer around one nn.Module (``self.module``): its size and device are the module's."""

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def _move(self, device):
        self.module.to(device)


class TokrayVQ(_NetworkTokenizer):
    """tokray's conv VQ (``models/tokenizer.py``): cosine nearest code, one safetensors artifact."""

    kind = "tokray"

    def __init__(self, model, spec: str, fingerprint: str, config: dict, extra: dict):
        super().__init__(spec, fingerprint, model.grid, model.image_size, config, extra)
        self.module = model

    @property
    def codebook(self) -> torch.Tensor:
        return self.module.quantizer.codebook

    def _features(self, x):
        return self.module.encoder(x)

    def _lookup(self, z, codes):
        if codes is None:
            return self.module.quantizer.lookup(z)  # exactly the model's own encode
        zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=1)
        ids = (zf @ self.codebook[codes.to(z.device)].t()).argmax(dim=1)
        return ids.view(z.shape[0], z.shape[2], z.shape[3])

    def encode(self, x):
        if self.dtype == torch.float32:  # the path every shipped dataset was made with
            return self.module.encode(x.to(self.device, non_blocking=True))
        return super().encode(x)

    def _decode(self, ids):
        return self.module.decoder(self.module.quantizer.embed(ids))


def save_tokenizer(model, model_name: str, model_args: dict, path: str, extra: dict | None = None) -> str:
    """Write a tokray tokenizer's weights and config to ``path``; returns its fingerprint."""
    config = {"model": model_name, "model_args": {**model_args, "codebook_size": model.codebook_size}}
    return save_artifact(path, model.state_dict(), config, extra)


def _load_tokray(path: str) -> TokrayVQ:
    tensors, info = load_artifact(path, "tokenizer", MAKE_ONE)
    model = models.create_model(info.config["model"], **factory_args(info.config))
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return TokrayVQ(model, path, info.fingerprint, info.config, info.extra)


# -- diffusers VQModel --------------------------------------------------------------------------


class DiffusersVQ(_NetworkTokenizer):
    """A diffusers ``VQModel``: ``encode(x).latents`` (after quant_conv), the nearest code by L2 distance
    (VectorQuantizer's rule), decode of the code vectors without re-quantizing."""

    kind = "diffusers"

    def __init__(self, model, spec: str, fingerprint: str, config: dict, image_size: int, mean, std,
                 extra: dict | None = None):
        levels = len(model.config.block_out_channels) - 1  # one 2x downsampling between blocks
        grid = image_size // 2 ** levels
        super().__init__(spec, fingerprint, (grid, grid), image_size, config, extra, mean, std)
        self.module = model

    @property
    def codebook(self) -> torch.Tensor:
        return self.module.quantize.embedding.weight.detach()

    def _features(self, x):
        return self.module.encode(x).latents

    def _lookup(self, z, codes):
        book = self.codebook.float()
        if codes is not None:
            book = book[codes.to(book.device)]
        zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        rows = max(1, 2 ** 24 // book.shape[0])  # bound the distance matrix (~64 MB) for big codebooks
        ids = torch.cat([torch.argmin(torch.cdist(zf[s:s + rows], book), dim=1) for s in range(0, len(zf), rows)])
        return ids.view(z.shape[0], z.shape[2], z.shape[3])

    def _decode(self, ids):
        n, h, w = ids.shape
        shape = (n, h, w, self.codebook.shape[1])
        if self.module.config.lookup_from_codebook:  # the model looks the ids up itself
            return self.module.decode(ids.reshape(-1), force_not_quantize=True, shape=shape).sample
        quant = self.module.quantize.get_codebook_entry(ids.reshape(-1), shape)
        return self.module.decode(quant, force_not_quantize=True).sample


def _diffusers_files(path: str, weights: str | None) -> tuple[str, str]:
    """(config.json, weights.safetensors) of a diffusers VQModel given as a folder, a pipeline folder
    with a vqvae/ subfolder, or a config file (with ``weights``)."""
    hint = ("give a VQModel save_pretrained folder (config.json + diffusion_pytorch_model.safetensors), a pipeline "
            "folder with vqvae/, or diffusers:CONFIG.json?weights=FILE.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no diffusers model at {path}; {hint}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "vqvae", "config.json")):
            path = os.path.join(path, "vqvae")
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"{path} has no config.json (nor vqvae/config.json); {hint}")
        if weights is None:
            names = sorted(f for f in os.listdir(path) if f.startswith("diffusion_pytorch_model")
                           and f.endswith(".safetensors") and "index" not in f)
            plain = [f for f in names if f == "diffusion_pytorch_model.safetensors"]
            if plain or len(names) == 1:
                weights = os.path.join(path, (plain or names)[0])
            elif names:
                raise ValueError(f"{path} holds several weight variants {names}; pick one with "
                                 f"diffusers:{path}?weights=FILE")
            elif any(f.endswith(".bin") for f in os.listdir(path)):
                raise ValueError(f"{path} holds only PyTorch pickle weights (.bin); tokray never unpickles model "
                                 "files: convert them to safetensors (save_pretrained(..., safe_serialization=True))")
            else:
                raise FileNotFoundError(f"{path} has no diffusion_pytorch_model.safetensors; {hint}")
    else:
        config = path
        if weights is None:
            raise ValueError(f"{path} is a file: give its weights too, diffusers:{path}?weights=FILE.safetensors; {hint}")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"diffusers weights {weights} not found; {hint}")
    if not weights.endswith(".safetensors"):
        raise ValueError(f"diffusers weights {weights} must be a .safetensors file (tokray never unpickles model files)")
    return config, weights


def _load_diffusers(spec: str, rest: str) -> DiffusersVQ:
    path, _, query = rest.partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(opts) - {"size", "norm", "weights"})
    if unknown:
        raise ValueError(f"tokenizer {spec!r}: unknown option(s) {unknown}; valid: size=N, norm=pm1|01|imagenet, "
                         "weights=FILE.safetensors")
    if opts.get("norm", "pm1") not in NORMS:
        raise ValueError(f"tokenizer {spec!r}: norm must be one of {sorted(NORMS)}, got {opts['norm']!r}")
    config_path, weights_path = _diffusers_files(os.path.expanduser(path), opts.get("weights"))
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path} is not a readable JSON config ({type(e).__name__}: {e})") from None
    if raw.get("_class_name", "VQModel") != "VQModel":
        raise ValueError(f"{config_path} describes a diffusers {raw['_class_name']}, not a VQModel: only a vector-"
                         "quantized autoencoder gives discrete ids")
    mean, std = NORMS[opts.get("norm", "pm1")]
    try:
        size = int(opts.get("size", raw.get("sample_size", 32)))
    except ValueError:
        raise ValueError(f"tokenizer {spec!r}: size must be an integer, got {opts['size']!r}") from None
    levels = len(raw.get("block_out_channels", (64,))) - 1
    if size <= 0 or size % 2 ** levels:
        raise ValueError(f"tokenizer {spec!r}: image size {size} must be a positive multiple of {2 ** levels} "
                         f"(the model downsamples {2 ** levels}x); set ?size=N")
    from safetensors.torch import load_file

    tensors = load_file(weights_path)  # as stored (bf16 stays bf16): what the fingerprint hashes
    config = {"kind": "diffusers.VQModel", "model": {k: v for k, v in raw.items() if not k.startswith("_")},
              "image_size": size, "mean": list(mean), "std": list(std)}
    fp = artifact_fingerprint(tensors, config)
    del tensors
    from diffusers import VQModel  # imported only for this kind (a few seconds)

    with tempfile.TemporaryDirectory() as tmp:  # one loader for a folder and for config + weights
        os.symlink(os.path.abspath(config_path), os.path.join(tmp, "config.json"))
        os.symlink(os.path.abspath(weights_path), os.path.join(tmp, "diffusion_pytorch_model.safetensors"))
        model = VQModel.from_pretrained(tmp, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False,
                                        torch_dtype=torch.float32)
    model.eval().requires_grad_(False)
    return DiffusersVQ(model, spec, fp, config, size, mean, std,
                       extra={"config_file": os.path.abspath(config_path), "weights_file": os.path.abspath(weights_path)})


# -- a dataset's codebook -----------------------------------------------------------------------


class CodebookOnly(Tokenizer):
    """The codebook a token dataset carries (``codebook.safetensors``): what training and token
    augmentation need; no encoder, no decoder."""

    kind = "codebook"
    can_encode = False
    can_decode = False

    def __init__(self, codebook: torch.Tensor, spec: str, fingerprint: str, grid, config: dict, extra: dict):
        super().__init__(spec, fingerprint, grid, None, config, extra)
        self._codebook = codebook

    @property
    def codebook(self):
        return self._codebook

    def _move(self, device):
        self._codebook = self._codebook.to(device)

    def _unavailable(self, what: str) -> str:
        return (f"tokenizer {self.spec} holds only a codebook ({self.codebook_size} codes x {self.codebook.shape[1]} "
                f"dims{', a SeiT import' if str(self.fingerprint).startswith('seit-codebook:') else ''}): it cannot "
                f"{what} images. Training and token augmentation on the dataset's ids work with it; raw-image "
                f"evaluation, tokenizing and TokenAdapt need the full tokenizer that made the ids "
                f"(PATH.safetensors or diffusers:PATH, fingerprint {self.fingerprint})")


def _load_codebook(spec: str, uri: str) -> CodebookOnly:
    import safetensors.torch

    from tokray.storage.dataset import open_dataset

    ds = open_dataset(uri)
    if ds.manifest.kind != "tokens":
        raise ValueError(f"tokenizer {spec!r}: {ds.uri} is a {ds.manifest.kind} dataset, not a token dataset")
    if CODEBOOK_FILE not in ds.manifest.files:
        raise ValueError(f"tokenizer {spec!r}: {ds.uri} carries no {CODEBOOK_FILE} (only SeiT imports and pruned "
                         f"datasets do); use the tokenizer that made it (fingerprint {ds.meta.tokenizer})")
    codebook = safetensors.torch.load(ds.read_file(CODEBOOK_FILE))["codebook"].float()
    if codebook.ndim != 2 or codebook.shape[0] != ds.meta.codebook_size:
        raise ValueError(f"{ds.uri}: {CODEBOOK_FILE} holds {tuple(codebook.shape)}, the manifest says "
                         f"{ds.meta.codebook_size} codes; the dataset is inconsistent")
    return CodebookOnly(codebook, spec, ds.meta.tokenizer, ds.meta.grid,
                        {"kind": "codebook", "dataset": ds.uri, "codebook_shape": list(codebook.shape)},
                        {"source": ds.meta.extra.get("source", "")})


# -- a pruned view ------------------------------------------------------------------------------


def pruned_fingerprint(base_fingerprint: str, keep) -> str:
    """The fingerprint of ``base`` seen through a prune map that keeps codes ``keep`` (in that order)."""
    h = hashlib.sha256(f"pruned:{base_fingerprint}:".encode())
    h.update(np.asarray(keep, dtype="<u4").tobytes())
    return h.hexdigest()[:16]


class PrunedTokenizer(Tokenizer):
    """``base`` with ids remapped to the K codes ``keep`` (new id i = base code keep[i])."""

    kind = "pruned"

    def __init__(self, base: Tokenizer, keep, fingerprint: str | None = None):
        keep = torch.as_tensor(np.asarray(keep, dtype=np.int64))
        fp = fingerprint or pruned_fingerprint(base.fingerprint, keep.numpy())
        super().__init__(base.spec, fp, base.grid, base.image_size,
                         {"kind": "pruned", "base_tokenizer": base.fingerprint, "base_codebook_size": base.codebook_size,
                          "codes": int(len(keep))}, {}, base.mean, base.std)
        self.base, self.keep = base, keep
        self.can_encode, self.can_decode = base.can_encode, base.can_decode

    @property
    def codebook(self):
        return self.base.codebook[self.keep.to(self.base.codebook.device)]

    @property
    def num_parameters(self) -> int:
        return self.base.num_parameters

    def describe(self) -> str:
        return (f"{self.base.describe()} pruned to {len(self.keep)} of {self.base.codebook_size} codes "
                f"(fingerprint {self.fingerprint})")

    def _unavailable(self, what: str) -> str:
        return self.base._unavailable(what)

    def to(self, device=None, dtype=None):
        self.base.to(device, dtype)
        return super().to(device, dtype)

    def encode(self, x):
        return self.base.lookup(self.base.features(x), self.keep)  # the nearest kept code, by base's rule

    def features(self, x):
        return self.base.features(x)

    def lookup(self, z, codes=None):
        return self.base.lookup(z, self.keep if codes is None else self.keep[codes.cpu()])

    def decode(self, ids):
        ids = torch.as_tensor(ids).long()
        return self.base.decode(self.keep.to(ids.device)[ids])  # exactly the base's decode of the original ids

    def dataset_files(self) -> dict[str, bytes]:
        import safetensors.torch

        return {CODEBOOK_FILE: safetensors.torch.save({"codebook": self.codebook.detach().float().cpu().contiguous()}),
                PRUNE_MAP_FILE: prune_map_bytes(self.base.fingerprint, self.base.codebook_size, self.keep.numpy(),
                                                self.fingerprint)}


def prune_map_bytes(base_fingerprint: str, base_codebook_size: int, keep, fingerprint: str) -> bytes:
    return json.dumps({"format": 1, "tokenizer": fingerprint, "base_tokenizer": base_fingerprint,
                       "base_codebook_size": int(base_codebook_size),
                       "keep": [int(k) for k in np.asarray(keep)]}).encode()


def read_prune_map(ds) -> dict | None:
    """A dataset's prune map (``keep``: base code of each id, ``base_tokenizer``), or None when not pruned."""
    if PRUNE_MAP_FILE not in ds.manifest.files:
        return None
    pm = json.loads(ds.read_file(PRUNE_MAP_FILE))
    if pm.get("tokenizer") != ds.meta.tokenizer or len(pm.get("keep", ())) != ds.meta.codebook_size:
        raise ValueError(f"{ds.uri}: {PRUNE_MAP_FILE} does not describe this dataset's ids (tokenizer "
                         f"{pm.get('tokenizer')}, {len(pm.get('keep', ()))} codes vs {ds.meta.tokenizer}, "
                         f"{ds.meta.codebook_size}); the dataset is inconsistent")
    return pm


# -- the resolver -------------------------------------------------------------------------------


def resolve_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer ``spec`` names (see ``SPEC_FORMS``)."""
    spec = str(spec).strip()
    if spec.startswith("diffusers:"):
        return _load_diffusers(spec, spec[len("diffusers:"):])
    if spec.startswith("codebook:"):
        return _load_codebook(spec, spec[len("codebook:"):])
    if not spec:
        raise ValueError(f"empty tokenizer; give {SPEC_FORMS}")
    if not spec.endswith(".safetensors") and os.path.isdir(spec):
        hint = f"diffusers:{spec}" if os.path.isfile(os.path.join(spec, "config.json")) else "a tokenizer file"
        raise ValueError(f"tokenizer {spec} is a folder; for a diffusers model write {hint}; forms: {SPEC_FORMS}")
    return _load_tokray(spec)


def tokenizer_for_dataset(tok: Tokenizer, ds) -> Tokenizer:
    """The tokenizer whose ids ``ds`` holds: ``tok`` itself, or ``tok`` through the dataset's prune map
    when the dataset was pruned from ``tok``'s ids; anything else is refused naming both."""
    if ds.meta.tokenizer == tok.fingerprint:
        return tok
    pm = read_prune_map(ds)
    if pm is not None and pm["base_tokenizer"] == tok.fingerprint:
        view = PrunedTokenizer(tok, pm["keep"])
        if view.fingerprint != ds.meta.tokenizer:
            raise ValueError(f"{ds.uri}: its prune map of tokenizer {tok.fingerprint} gives fingerprint "
                             f"{view.fingerprint}, the manifest records {ds.meta.tokenizer}; the dataset is inconsistent")
        return view
    made_by = ds.meta.tokenizer + (f" (pruned from tokenizer {pm['base_tokenizer']})" if pm else "")
    raise ValueError(f"dataset {ds.uri} was tokenized by tokenizer {made_by}, but tokenizer {tok.fingerprint} "
                     f"({tok.spec}) was given; use the dataset's own tokenizer or re-tokenize the images")


def load_tokenizer(spec: str, for_dataset=None) -> tuple[Tokenizer, dict]:
    """(tokenizer, info dict with 'fingerprint', 'config', 'extra', 'kind', 'spec') for ``spec``:
    ``PATH.safetensors`` (tokray), ``diffusers:PATH`` or ``codebook:DATASET_URI``.

    ``for_dataset`` (a URI or an open dataset): the tokenizer whose ids that dataset holds (the pruned
    view when it was pruned from ``spec``'s ids); another tokenizer's dataset is refused."""
    tok = resolve_tokenizer(spec)
    if for_dataset is not None:
        if isinstance(for_dataset, (str, os.PathLike)):
            from tokray.storage.dataset import open_dataset

            for_dataset = open_dataset(for_dataset)
        tok = tokenizer_for_dataset(tok, for_dataset)
    return tok, tok.info


def require_same_tokenizer(meta, fingerprint: str, where: str = "") -> None:
    """Ids are only meaningful with the tokenizer that made them; refuse any other.

    ``meta``: a token dataset's metadata (anything with a ``tokenizer`` fingerprint)."""
    if meta.tokenizer != fingerprint:
        raise ValueError(f"{where or 'dataset'} was tokenized by tokenizer {meta.tokenizer}, but tokenizer "
                         f"{fingerprint} was given; use the dataset's own tokenizer or re-tokenize the images")


def require_can(tok: Tokenizer, what: str, job: str) -> None:
    """Fail before any work when ``job`` needs ``tok`` to ``what`` ("encode"/"decode") and it cannot."""
    ok = tok.can_encode if what == "encode" else tok.can_decode
    if not ok:
        raise TokenizerUnavailable(f"{job} needs a tokenizer that can {what} images: {tok._unavailable(what)}")


def to_unit(pixels_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    if isinstance(pixels_uint8, np.ndarray):  # one copy to float32 (read-only arrays from Ray Data welcome)
        pixels_uint8 = torch.from_numpy(pixels_uint8.astype(np.float32))
    x = torch.as_tensor(pixels_uint8).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


@torch.no_grad()
def encode_pixels(model, pixels: np.ndarray, device) -> np.ndarray:
    """uint8 pixels [N, H, W, 3] -> uint16 ids [N, h, w], encoded on ``device`` (a Tokenizer or a module)."""
    x = to_unit(pixels).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return model.encode(x).to(torch.int32).cpu().numpy().astype(np.uint16)
