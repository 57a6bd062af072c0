"""A trained classifier outside the platform: export a fine-tuning checkpoint as a self-contained model
folder, and predict the classes of raw image files with it.

An exported folder (``export_model``, ``jobs/export.py``) holds:

- ``model.safetensors``: the classifier's weights only (no optimizer), a tokray artifact
  (``tokray.artifacts``): its metadata holds ``{"model", "model_args"}`` and a fingerprint;
- ``config.json``: the model name and factory arguments (grid, vocabulary, classes, widths: what
  ``models.create_model`` and ``timm.create_model`` take), the input (tokens: the tokenizer's grid and
  the evaluation view, the central ``crop`` of ``augment.out_size``; pixels: the stored size and JPEG
  quality), the class names, the tokenizer and where it came from (checkpoint, step, recipe, the
  frozen training config);
- ``tokenizer.safetensors``: a copy of the tokenizer the training tokens were made with, when it is a
  tokray file whose fingerprint is the checkpoint data's (a pruned dataset's prune map goes into
  ``config.json``); otherwise ``config.json`` records the tokenizer's reference (e.g. ``diffusers:PATH``)
  and fingerprint, and ``predict`` loads it from there or from ``--tokenizer``.

``predict(model_dir, images, top_k)`` decodes image files, tokenizes them on the fly with that tokenizer
(pixel baselines: resized and stored as JPEG the way their training data was), and returns the top-k
classes with their probabilities; the same view as ``tokray.eval.classify`` (and ``jobs/evaluate.py``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

log = logging.getLogger(__name__)

FORMAT = "tokray.model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.safetensors"
WHAT = "exported model"
MAKE_ONE = "export a fine-tuning checkpoint with `python jobs/export.py --checkpoint RUN --out DIR`"


# -- export ------------------------------------------------------------------------------------------


def export_model(checkpoint: str, out: str, *, ema: bool = False, tokenizer: str = "", overwrite: bool = False) -> dict:
    """Write the model folder ``out`` from a fine-tuning checkpoint (a run directory, a checkpoint_* directory
    or a state.pt); ``ema``: its EMA weights; ``tokenizer``: the tokenizer of its training tokens (default:
    the run's ``tokenizer`` setting, else the embedded CIFAR-10 tokenizer; checked by fingerprint).
    Atomic: written beside ``out`` and renamed into place. Returns a summary."""
    import models
    from tokray.artifacts import save_artifact
    from tokray.eval.classify import load_classifier
    from tokray.train.checkpoint import resolve_checkpoint
    from tokray.train.tasks import model_grid

    out = os.path.abspath(out)
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")
    ckpt = resolve_checkpoint(checkpoint)
    model, task, spec = load_classifier(ckpt, ema)  # refuses MTM checkpoints, and --ema without EMA weights
    cfg = task.cfg
    if spec.is_tokens:
        model_args = {"grid": list(model_grid(cfg, spec)), "vocab_size": spec.codebook_size}
        inputs = {"kind": "tokens", "grid": list(spec.grid), "codebook_size": spec.codebook_size,
                  "crop": int(cfg.augment.out_size)}
    else:
        model_args = {"img_size": spec.image_size}
        inputs = {"kind": "pixels", "image_size": spec.image_size, "quality": spec.quality, "encoding": "jpeg"}
    model_args = {**model_args, "num_classes": spec.num_classes, **cfg.model_args}
    tensors = model.state_dict()
    # the exported arguments must build a model the weights load into strictly (what predict and timm do)
    models.create_model(cfg.model, **_factory(model_args)).load_state_dict(tensors, strict=True)
    step = _step(ckpt)
    source = {"checkpoint": ckpt, "step": step, "recipe": cfg.recipe, "weights": "ema" if ema else "model",
              "data": cfg.data or "(embedded CIFAR-10 training tokens)"}

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        fp = save_artifact(os.path.join(tmp, WEIGHTS_FILE), tensors, {"model": cfg.model, "model_args": model_args},
                           extra=source, fields={"task": "classify"})
        tok = _export_tokenizer(spec, cfg, tokenizer, tmp) if spec.is_tokens else None
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg.model, "model_args": model_args,
                  "weights": WEIGHTS_FILE, "fingerprint": fp, "input": inputs, "class_names": list(spec.class_names),
                  "tokenizer": tok, "source": source, "train_config": json.loads(cfg.to_json())}
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=1)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s weights of %s, step %s) to %s", cfg.model, source["weights"], ckpt, step, out)
    return {"out": out, "model": cfg.model, "fingerprint": fp, "input": inputs["kind"], "classes": spec.num_classes,
            "weights": source["weights"], "checkpoint": ckpt, "step": step,
            "tokenizer": (tok or {}).get("file") or (tok or {}).get("reference") or ("-" if tok is None else "?"),
            "tokenizer_fingerprint": (tok or {}).get("fingerprint"),
            "bytes": sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))}


def _factory(model_args: dict) -> dict:
    from tokray.artifacts import factory_args

    return factory_args({"model_args": model_args})


def _step(ckpt: str):
    """The checkpoint's step, from the metrics.json beside its state.pt (None when absent)."""
    path = os.path.join(os.path.dirname(ckpt), "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("step")


def _swap_into_place(tmp: str, out: str) -> None:
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    old = f"{out}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.remove(old)


def _absolute_spec(spec: str) -> str:
    """A tokenizer reference that still resolves from another working directory."""
    if spec.startswith("diffusers:"):
        path, q, opts = spec[len("diffusers:"):].partition("?")
        return f"diffusers:{os.path.abspath(path)}{q}{opts}"
    if spec.startswith("codebook:") or "://" in spec:
        return spec
    return os.path.abspath(spec)


def _export_tokenizer(spec, cfg, given: str, tmp: str) -> dict:
    """Copy (tokray file) or reference (diffusers, codebook-only) the tokenizer of the checkpoint's tokens."""
    from tokray.assets import default_tokenizer, default_tokens
    from tokray.data.tokenizer import PrunedTokenizer, load_tokenizer

    want = spec.tokenizer
    candidates = [given] if given else list(dict.fromkeys(c for c in (cfg.tokenizer, default_tokenizer()) if c))
    for cand in candidates:
        try:
            tok, _ = load_tokenizer(cand)
        except (FileNotFoundError, ValueError) as e:
            if given:
                raise
            log.info("tokenizer %s does not load (%s); trying the next", cand, str(e).splitlines()[0])
            continue
        if tok.fingerprint != want:  # a dataset pruned from this tokenizer's ids: its prune map rebuilds the view
            try:
                tok, _ = load_tokenizer(cand, for_dataset=cfg.data or default_tokens("train"))
            except (FileNotFoundError, ValueError, ConnectionError):
                pass
        if tok.fingerprint != want:
            if given:
                raise ValueError(f"--tokenizer {given} is tokenizer {tok.fingerprint}, but the checkpoint was trained "
                                 f"on tokens of tokenizer {want}; pass the tokenizer its training data was made with")
            continue
        record = {"fingerprint": want, "kind": tok.kind, "reference": _absolute_spec(cand), "file": None,
                  "image_size": tok.image_size, "grid": list(tok.grid), "codebook_size": tok.codebook_size}
        base = tok
        if isinstance(tok, PrunedTokenizer):
            base = tok.base
            record["prune"] = {"base_tokenizer": base.fingerprint, "keep": [int(k) for k in tok.keep.tolist()]}
        if base.kind == "tokray":
            shutil.copyfile(base.spec, os.path.join(tmp, TOKENIZER_FILE))
            os.chmod(os.path.join(tmp, TOKENIZER_FILE), 0o644)
            record["file"] = TOKENIZER_FILE
        elif not tok.can_encode:
            log.warning("tokenizer %s cannot encode images (%s); predict needs the full tokenizer: --tokenizer",
                        cand, tok.kind)
        else:
            log.info("tokenizer %s (%s) is referenced, not copied: predict loads it from there", record["reference"],
                     tok.kind)
        return record
    return _tokenizer_reference(want, cfg.data or default_tokens("train"), candidates)


def _tokenizer_reference(want: str, data_uri: str, tried: list[str]) -> dict:
    """No tokenizer at hand with the checkpoint data's fingerprint: record what the training data says (its
    prune map, so predict --tokenizer BASE rebuilds the view; a SeiT import's codebook), and the fingerprint."""
    from tokray.data.seit_import import CODEBOOK_FILE
    from tokray.data.tokenizer import read_prune_map
    from tokray.storage.dataset import open_dataset

    record = {"fingerprint": want, "kind": None, "reference": None, "file": None}
    try:
        ds = open_dataset(data_uri)
        pm = read_prune_map(ds)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        ds = pm = None
        log.info("training data %s not readable (%s)", data_uri, str(e).splitlines()[0])
    if pm is not None:
        record["prune"] = {"base_tokenizer": pm["base_tokenizer"], "keep": [int(k) for k in pm["keep"]]}
    elif ds is not None and CODEBOOK_FILE in ds.manifest.files:  # a SeiT import: only the codebook exists here
        record.update(kind="codebook", reference=f"codebook:{ds.uri}")
    base = f" (or the base tokenizer {pm['base_tokenizer']} of its prune map)" if pm else ""
    log.warning("no tokenizer with fingerprint %s found (tried %s): the export records the fingerprint only; pass "
                "export --tokenizer (the tokenizer the training tokens were made with%s), or predict --tokenizer",
                want, ", ".join(tried) or "none", base)
    return record


# -- predict -----------------------------------------------------------------------------------------


class ExportedModel:
    """An exported model folder, loaded: ``predict(images, top_k)``. ``tokenizer`` overrides the folder's
    (checked against its fingerprint)."""

    def __init__(self, model_dir: str, tokenizer: str = "", device=None):
        import models
        from tokray.artifacts import factory_args, load_artifact
        from tokray.devices import local_device

        self.dir = os.path.abspath(model_dir)
        self.config = read_config(self.dir)
        self.device = device or local_device()
        tensors, info = load_artifact(os.path.join(self.dir, self.config["weights"]), WHAT, MAKE_ONE)
        self.model = models.create_model(info.config["model"], **factory_args(info.config))
        self.model.load_state_dict(tensors, strict=True)
        self.model.eval().to(self.device)
        self.class_names = list(self.config["class_names"])
        self.input = self.config["input"]
        self.tokenizer = self._tokenizer(tokenizer) if self.input["kind"] == "tokens" else None

    def _tokenizer(self, override: str):
        from tokray.data.tokenizer import PrunedTokenizer, load_tokenizer, require_can

        rec = self.config["tokenizer"] or {}
        want = rec.get("fingerprint")
        spec = override or (os.path.join(self.dir, rec["file"]) if rec.get("file") else rec.get("reference"))
        if not spec:
            raise ValueError(f"{self.dir} was exported without its tokenizer (fingerprint {want}); pass --tokenizer "
                             f"with the tokenizer its training tokens were made with")
        tok, _ = load_tokenizer(spec)
        prune = rec.get("prune")
        if prune and tok.fingerprint == prune["base_tokenizer"]:  # the training tokens' view of the base tokenizer
            tok = PrunedTokenizer(tok, prune["keep"])
        if tok.fingerprint != want:
            raise ValueError(f"{self.dir} was trained on tokens of tokenizer {want}, but {spec} is tokenizer "
                             f"{tok.fingerprint}; pass the tokenizer its training tokens were made with")
        require_can(tok, "encode", "predict")
        return tok.to(self.device)

    def inputs(self, images: list):
        """Decoded, tokenized (or stored as JPEG) model inputs of a list of images (paths or encoded bytes)."""
        import numpy as np
        import torch

        from tokray.data.images import decode_image

        if self.tokenizer is not None:
            from tokray.augment.geometry import center_crop_ids
            from tokray.data.tokenizer import encode_pixels

            pixels = np.stack([_decode(im, self.tokenizer.image_size, decode_image) for im in images])
            ids = torch.from_numpy(encode_pixels(self.tokenizer, pixels, self.tokenizer.device).astype(np.int64))
            return center_crop_ids(ids, self.input["crop"])
        from tokray.storage.formats.pixels import decode_jpegs, encode_jpeg

        size, quality = self.input["image_size"], self.input["quality"]
        stored = decode_jpegs([encode_jpeg(_decode(im, size, decode_image), quality) for im in images], size)
        return torch.from_numpy(stored).permute(0, 3, 1, 2).contiguous()

    def predict(self, images, top_k: int = 5, batch_size: int = 256) -> list[dict]:
        """Per image: {"image", "class", "prob", "top": [{"class", "index", "prob"}, ... top_k]} in input order."""
        import torch

        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        images = [images] if isinstance(images, (str, bytes, os.PathLike)) else list(images)
        if not images:
            raise ValueError("no images to predict: give image files")
        k = min(top_k, len(self.class_names))
        results = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            with torch.no_grad():
                probs = torch.softmax(self.model(self.inputs(chunk).to(self.device)).float(), dim=-1).cpu()
            p, idx = probs.topk(k, dim=-1)
            for j, im in enumerate(chunk):
                top = [{"class": self.class_names[i], "index": int(i), "prob": float(q)}
                       for q, i in zip(p[j].tolist(), idx[j].tolist())]
                results.append({"image": _name(im, start + j), "class": top[0]["class"], "prob": top[0]["prob"],
                                "top": top})
        return results


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {WHAT} at {model_dir} (no {CONFIG_FILE}); {MAKE_ONE}")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}); the folder is damaged: export it again") from None
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} config (format {config.get('format')!r} v"
                         f"{config.get('format_version')!r}); {MAKE_ONE}")
    return config


def load_model(model_dir: str, tokenizer: str = "", device=None) -> ExportedModel:
    """The exported model at ``model_dir``, ready to ``predict`` (load once, predict many times)."""
    return ExportedModel(model_dir, tokenizer, device)


def predict(model_dir: str | ExportedModel, images, top_k: int = 5, *, tokenizer: str = "", device=None,
            batch_size: int = 256) -> list[dict]:
    """Top-``top_k`` classes of each image (file paths or encoded bytes) under the exported model ``model_dir``."""
    model = model_dir if isinstance(model_dir, ExportedModel) else load_model(model_dir, tokenizer, device)
    return model.predict(images, top_k, batch_size)


def _name(image, i: int) -> str:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"<image {i}>"


def _decode(image, size: int, decode_image):
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"no image file at {os.fspath(image)}")
        with open(image, "rb") as f:
            data = f.read()
    else:
        data = bytes(image)
    try:
        return decode_image(data, size)
    except Exception as e:  # PIL raises many types for a file that is not an image
        raise ValueError(f"{_name(image, 0) if isinstance(image, (str, os.PathLike)) else 'an image'} is not a "
                         f"readable image ({type(e).__name__}: {e})") from None
