"""Search spaces of a sweep (``jobs/sweep.py --space FILE.yaml``): config keys mapped to Ray Tune samplers.

A key is what ``--set`` takes (a ``TrainConfig`` field, ``augment.<field>``; nested ``augment:`` mappings
work too, as in ``--config``) and its value one sampler::

    lr: {loguniform: [1.0e-4, 3.0e-3]}
    layer_decay: {grid: [0.65, 0.75]}
    augment:
      coloradapt_prob: {uniform: [0.0, 0.5]}
      tokenadapt: {choice: [true, false]}
      rrc_scale: {choice: [[0.35, 1.0], [0.6, 1.0]]}

Samplers: ``choice`` and ``grid`` (values), ``uniform``, ``loguniform`` and ``randint`` ([low, high]).
Settings that only make sense together are one choice of ``augment`` (or ``model_args``) mappings, e.g.
SeiT++ without TokenAdapt also drops its f-space Mixup::

    augment: {choice: [{tokenadapt: true}, {tokenadapt: false, mixup_alpha: 0.0}]}

The keys and values are checked with ``tokray.overrides`` against every swept recipe before any trial
starts: an unknown key is refused with the valid ones, and every corner of the space (each choice, each
bound) is built as a config, so a combination the config refuses (``noise_prob + coloradapt_prob > 1``)
fails here, not in a trial.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch  # (optuna itself is imported when --search optuna runs)

from tokray.overrides import NESTED

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")
SEARCHES = ("random", "grid", "optuna")
_MAX_CORNERS = 4096  # corners checked before the sweep starts (all of them in any space written by hand)


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched config key: its sampler and the sampler's values (choice/grid) or (low, high)."""

    key: str
    sampler: str
    values: tuple

    def __post_init__(self):
        object.__setattr__(self, "values", tuple(_tune_value(v) for v in self.values))

    def config_value(self, v):
        """A sampled value as the overrides take it (a mapping of settings travels as JSON text)."""
        return json.loads(v) if self.key in NESTED else v

    @property
    def ranged(self) -> bool:
        return self.sampler in ("uniform", "loguniform", "randint")

    def domain(self, as_grid: bool = False):
        """The Ray Tune domain (``as_grid``: a choice becomes a grid, for ``--search grid``)."""
        from ray import tune

        if self.sampler == "grid" or (as_grid and self.sampler == "choice"):
            return tune.grid_search(list(self.values))
        if self.sampler == "choice":
            return tune.choice(list(self.values))
        if self.sampler == "randint":  # Tune's randint excludes the upper bound; the YAML's is inclusive
            return tune.randint(self.values[0], self.values[1] + 1)
        return getattr(tune, self.sampler)(*self.values)


def _tune_value(v):
    """Lists (a (min, max) field's value) travel as "a,b" text, mappings as JSON: Optuna's categorical values
    must be scalars, and the overrides parse "a,b" for tuple fields."""
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else v


def load_space(path: str, recipes, search: str = "random") -> tuple[Param, ...]:
    """The parameters of ``path``, checked against every recipe in ``recipes`` (names) for ``search``."""
    from tokray.overrides import load_config_file

    if search not in SEARCHES:
        raise ValueError(f"--search {search!r}: choose one of {', '.join(SEARCHES)}")
    where = f"--space {path}"
    params = tuple(_param(*_unnest(key, spec), where) for key, spec, _ in load_config_file(path))
    if not params:
        raise ValueError(f"{where} holds no parameter; map config keys to samplers, e.g. `lr: {{loguniform: "
                         f"[1.0e-4, 3.0e-3]}}`")
    check_space(params, recipes, search, where)
    return params


def _unnest(key: str, spec) -> tuple[str, object]:
    """``augment: {choice: [...]}`` reads as the key ``augment.choice``: it is a sampler of ``augment`` itself."""
    head, _, tail = key.rpartition(".")
    return (head, {tail: spec}) if head in NESTED and tail in SAMPLERS else (key, spec)


def _param(key: str, spec, where: str) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
        raise ValueError(f"{where}: {key!r} needs one sampler, one of {', '.join(SAMPLERS)} (e.g. `{key}: {{choice: "
                         f"[a, b]}}`), got {spec!r}")
    sampler, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: {key}: {sampler} takes a non-empty list, got {values!r}")
    if key in NESTED and (sampler not in ("choice", "grid") or not all(isinstance(v, dict) for v in values)):
        raise ValueError(f"{where}: {key} takes a choice or grid of mappings of its settings (e.g. `{key}: {{choice: "
                         f"[{{a: 1}}, {{a: 0, b: 0}}]}}`), got {sampler} {values!r}")
    if sampler in ("uniform", "loguniform", "randint"):
        values = [_number(v) for v in values]
        ok = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not ok or not values[0] < values[1] or (sampler == "loguniform" and values[0] <= 0):
            raise ValueError(f"{where}: {key}: {sampler} takes [low, high] numbers with low < high"
                             f"{' and low > 0' if sampler == 'loguniform' else ''}, got {values!r}")
        if sampler == "randint" and not all(isinstance(v, int) for v in values):
            raise ValueError(f"{where}: {key}: randint takes whole numbers, got {values!r}")
    return Param(key=str(key), sampler=sampler, values=tuple(values))


def _number(v):
    """YAML 1.1 reads 1e-3 (no dot) as text: a bound that reads as a number is one."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    return v


def check_space(params: tuple[Param, ...], recipes, search: str, where: str = "--space") -> None:
    """Every key valid and every corner of the space a valid config of every recipe, else a ValueError."""
    from tokray.overrides import apply_overrides
    from tokray.recipes import get_recipe

    if search == "grid":
        ranged = [p.key for p in params if p.ranged]
        if ranged:
            raise ValueError(f"--search grid enumerates values; {', '.join(ranged)} use a range: give them choice or "
                             f"grid values, or use --search random|optuna")
    if search == "optuna":
        grids = [p.key for p in params if p.sampler == "grid"]
        if grids:
            raise ValueError(f"--search optuna samples and cannot enumerate a grid; use choice for {', '.join(grids)}")
    dup = sorted({p.key for p in params if sum(q.key == p.key for q in params) > 1})
    if dup:
        raise ValueError(f"{where} names {', '.join(dup)} more than once")
    for r in recipes:
        base = get_recipe(r)
        # every corner (an unknown key fails at the first, naming the valid ones)
        corners = itertools.islice(itertools.product(*([(p, v) for v in p.values] for p in params)), _MAX_CORNERS)
        for combo in corners:
            try:
                apply_overrides(base, [(p.key, p.config_value(v), where) for p, v in combo])
            except ValueError as e:
                at = ", ".join(f"{p.key}={v}" for p, v in combo)
                raise ValueError(f"{where}: recipe {r} refuses the corner {at}: {e}") from None


def param_space(params: tuple[Param, ...], search: str) -> dict:
    return {p.key: p.domain(as_grid=search == "grid") for p in params}


class EpochEndOptuna(OptunaSearch):
    """Optuna's TPE through Tune; trials report every logged step but val_top1 only at epoch ends, and
    Optuna takes only the reports that carry it."""

    def on_trial_result(self, trial_id: str, result: dict):
        if self.metric in result:
            super().on_trial_result(trial_id, result)


def search_alg(search: str, seed: int):
    """The Tune searcher of ``search``: Tune's own random/grid generator, or Optuna's TPE (seeded)."""
    if search == "optuna":
        import optuna

        return EpochEndOptuna(metric="val_top1", mode="max", sampler=optuna.samplers.TPESampler(seed=seed))
    return BasicVariantGenerator(random_state=seed)


def sampled_overrides(config: dict, params, where: str = "--space") -> list[tuple[str, object, str]]:
    """A Tune trial's sampled ``config`` -> the (key, value, where) overrides of its recipe."""
    return [(p.key, p.config_value(config[p.key]), where) for p in params]
