"""The whole run config from the command line: ``--set KEY=VALUE`` (repeatable) and ``--config FILE.yaml``.

A key is a ``TrainConfig`` field (``lr``), ``augment.<field>`` (an ``AugmentConfig`` field) or
``model_args.<key>`` (what the model factory takes: free-form, merged into the recipe's). A YAML file
holds the same keys as a mapping, nested (``augment:`` / ``model_args:`` mappings, merged into the
recipe's) or dotted; a saved ``config.json`` is valid YAML too, so ``--config runs/x/config.json``
reruns a run's settings. Values parse as YAML scalars or lists (``--set rrc_scale=[0.35,1.0]``) and
are checked against the dataclass field types; string fields take the ``--set`` text as it is. An
unknown key is refused in one line that lists the valid ones. The overrides are applied at once, so
the frozen dataclasses validate the final combination only (``__post_init__``), and the result is the
one frozen config the run prints and saves.

Why hand-written (about 150 lines) rather than jsonargparse or tyro: both build a whole CLI from the
dataclass (one ``--augment.noise_prob`` flag per field, 60 in ``--help``) with the dataclass defaults
as the base, while here a recipe function supplies the base config and the jobs keep their few named
flags; the parsing itself is PyYAML's (installed with Ray), and the type checks are a few lines over
``typing.get_type_hints``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing

from tokray.config import AugmentConfig, TrainConfig

# fields whose value is a mapping: a mapping given for them (nested YAML, --set augment={...}) merges key by key
NESTED = ("augment", "model_args")


class _Text(str):
    """A value as typed after ``--set KEY=``: parsed as YAML unless the field is a string."""


def parse_set(items: typing.Iterable[str]) -> list[tuple[str, object, str]]:
    """``["augment.noise_prob=0.1", ...]`` -> [(key, raw text, where)] in order (later ones win)."""
    out = []
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE (e.g. --set augment.coloradapt_prob=0.5), got {item!r}")
        out.append((key.strip(), _Text(value), f"--set {item}"))
    return out


def load_config_file(path: str) -> list[tuple[str, object, str]]:
    """A YAML (or JSON) mapping of overrides -> [(dotted key, value, where)]."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file; give a YAML file of config overrides")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"--config {path} is not valid YAML ({' '.join(first[:2])})") from None
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of config fields (e.g. `lr: 1e-3` and an `augment:` "
                         f"mapping), got a {type(data).__name__}")
    return [(k, v, f"--config {path}") for k, v in _flatten(data)]


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if not prefix and key in NESTED and isinstance(v, dict):
            out += [(f"{key}.{sub}", val) for sub, val in v.items()]
        else:
            out.append((key, v))
    return out


def valid_keys() -> list[str]:
    """Every settable key: TrainConfig fields, then augment.<field> (model_args.<key> is free-form)."""
    return [f.name for f in dataclasses.fields(TrainConfig)] + \
           [f"augment.{f.name}" for f in dataclasses.fields(AugmentConfig)]


def apply_overrides(cfg: TrainConfig, overrides: list[tuple[str, object, str]]) -> TrainConfig:
    """``cfg`` with ``overrides`` ([(key, value, where)], later entries win) applied at once."""
    top_types = typing.get_type_hints(TrainConfig)
    aug_types = typing.get_type_hints(AugmentConfig)
    top, aug, margs = {}, {}, {}
    expanded = []
    for key, value, where in overrides:  # `augment={...}` / `model_args={...}` as mappings: merge key by key
        if key in NESTED:
            value = _yaml(key, value, where)
            if not isinstance(value, dict):
                raise ValueError(f"config field {key!r} takes a mapping of its keys (e.g. {key}.KEY=VALUE), got "
                                 f"{value!r} ({where})")
            expanded += [(f"{key}.{k}", v, where) for k, v in value.items()]
        else:
            expanded.append((key, value, where))
    for key, value, where in expanded:
        head, _, sub = key.partition(".")
        if head == "model_args" and sub:
            margs[sub] = _yaml(key, value, where)
        elif head == "augment" and sub:
            if sub not in aug_types:
                raise ValueError(_unknown(key, [f"augment.{n}" for n in aug_types], "valid augment fields",
                                          sorted(aug_types), where))
            aug[sub] = _coerce(key, value, aug_types[sub], _default(AugmentConfig, sub), where)
        elif key in top_types and key not in NESTED:
            top[key] = _coerce(key, value, top_types[key], getattr(cfg, key), where)
        else:
            names = [n for n in top_types if n not in NESTED]
            raise ValueError(_unknown(key, valid_keys(), "valid fields",
                                      names + ["augment.<field>", "model_args.<key>"], where))
    if aug:
        top["augment"] = dataclasses.replace(cfg.augment, **aug)  # validates the augmentation once, as a whole
    if margs:
        top["model_args"] = {**cfg.model_args, **margs}
    return dataclasses.replace(cfg, **top) if top else cfg


def _unknown(key: str, candidates: list[str], what: str, names: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, candidates, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config field {key!r}{hint} in {where}; {what}: {', '.join(names)}"


def _default(cls, name: str):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _yaml(key: str, value, where: str):
    if not isinstance(value, _Text):
        return value
    import yaml

    try:
        return yaml.safe_load(str(value)) if value.strip() else ""
    except yaml.YAMLError:
        raise ValueError(f"config field {key!r}: {str(value)!r} is not a YAML value ({where})") from None


def _coerce(key: str, value, typ, default, where: str):
    """``value`` as the field's type, or a ValueError naming the field, the type and the value."""
    if typ is str:
        if isinstance(value, _Text):
            return str(value)
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        return _bad(key, "a string (quote it in YAML)", value, where)
    value = _yaml(key, value, where)
    if typ is bool:
        return value if isinstance(value, bool) else _bad(key, "true or false", value, where)
    if typ is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        return _bad(key, "an integer", value, where)
    if typ is float:
        return _number(key, value, where)
    if typ is tuple:
        if isinstance(value, str):  # --set rrc_scale=0.35,1.0
            value = [_yaml(key, _Text(v), where) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            return _bad(key, "a list, e.g. [0.35, 1.0]", value, where)
        if default and len(value) != len(default):
            return _bad(key, f"a list of {len(default)} values", value, where)
        if default and all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in default):
            return tuple(_number(key, v, where) if isinstance(d, float) else v for v, d in zip(value, default))
        return tuple(value)
    if typ is dict:
        return dict(value) if isinstance(value, dict) else _bad(key, "a mapping", value, where)
    raise AssertionError(f"config field {key} has a type ({typ}) overrides do not handle")


def _number(key: str, value, where: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return _bad(key, "a number", value, where)


def _bad(key: str, what: str, value, where: str):
    raise ValueError(f"config field {key!r} must be {what}, got {value!r} ({where})")
