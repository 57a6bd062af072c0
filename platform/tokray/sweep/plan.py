"""What a storage sweep runs: budget subsets of the token set, the shared MTM pre-trainings, and the
fine-tuning trials (token recipes and pixel baselines at matched bytes), each with its own run dir.

Everything lands under ``<out>/``: ``data/`` (subsets, pixel sets), ``mtm/`` (one pre-training per
budget and MTM recipe, shared by every trial that fine-tunes it), ``trials/`` (one run dir per
trial), ``tune/`` (Ray Tune's experiment state, for ``Tuner.restore``) and the results.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from tokray.recipes import get_recipe

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    out: str = "runs/sweep"
    data: str = ""  # token training set; "" = the embedded CIFAR-10 tokens
    eval_data: str = ""  # token validation set; "" = the embedded validation split
    images: str = ""  # raw images (same source as the tokens): pixel baselines and corrupted-val robustness
    budgets: tuple = ("100%", "30%", "10%")
    recipes: tuple = ("cifar_seit", "cifar_seit_mtm", "cifar_seitpp_nomtm", "cifar_seitpp")
    pixel_sizes: tuple = (32, 16, 8)  # pixel baselines: per budget, the best (size, quality) that fits its bytes
    epochs: float = 3.0  # fine-tuning epochs of every trial
    mtm_epochs: float = 3.0
    max_steps: int = 0  # > 0 caps every run (smoke test)
    model_args: dict = dataclasses.field(default_factory=dict, hash=False)  # shared width/depth overrides
    concurrent: int = 2  # trials at once (each one Ray Train worker)
    asha: bool = False
    corruption_severity: int = 3
    eval_limit: int = 0  # > 0: corrupted-val evaluation on the first N images only
    seed: int = 0
    # --config/--set of jobs/sweep.py: (key, value, where) applied to every token fine-tuning trial's recipe
    overrides: tuple = ()
    mlflow: str = ""  # --mlflow: every trial logs its params and metrics there

    def __post_init__(self):
        from tokray.storage.budget import Budget

        for name in ("out", "data", "eval_data", "images"):  # trials run in Tune's own working dirs
            value = getattr(self, name)
            if value and "://" not in value:
                object.__setattr__(self, name, os.path.abspath(value))

        for b in self.budgets:
            Budget.parse(b)
        for r in self.recipes:
            get_recipe(r, task="classify")
        if not self.recipes and not self.pixel_sizes:
            raise ValueError("nothing to sweep: give at least one recipe or pixel size")


def budget_slug(budget: str) -> str:
    return budget.replace("%", "pct").replace(".", "p")


def subset_uri(cfg: SweepConfig, budget: str) -> str:
    return os.path.join(os.path.abspath(cfg.out), "data", f"tokens-{budget_slug(budget)}")


def materialize_subsets(cfg: SweepConfig) -> dict[str, dict]:
    """One class-stratified subset per budget (nested across budgets); reruns reuse finished ones."""
    from tokray.assets import default_tokens
    from tokray.storage.budget import Budget, make_subset
    from tokray.storage.dataset import open_dataset

    src = cfg.data or default_tokens("train")
    full = open_dataset(src)
    jpeg_bytes = full.meta.extra.get("jpeg_bytes")
    out = {}
    for b in cfg.budgets:
        uri = subset_uri(cfg, b)
        try:
            ds = open_dataset(uri)
        except FileNotFoundError:
            if Budget.parse(b) == Budget.parse("100%"):
                log.info("budget %s: copying the full token set", b)
            make_subset(src, uri, Budget.parse(b), seed=cfg.seed)
            ds = open_dataset(uri)
        out[b] = {"uri": uri, "samples": len(ds), "store_bytes": ds.manifest.store_bytes,
                  "pct_jpeg": 100.0 * ds.manifest.store_bytes / jpeg_bytes if jpeg_bytes else None}
        log.info("budget %s: %d samples, %d bytes on the store (%s of the JPEG bytes)", b, len(ds),
                 ds.manifest.store_bytes, f"{out[b]['pct_jpeg']:.2f}%" if jpeg_bytes else "?")
    return out


def mtm_runs(cfg: SweepConfig, subsets: dict) -> list[dict]:
    """One MTM pre-training per (budget, MTM recipe named by a swept recipe's ``pretrain``)."""
    runs = []
    for b, sub in subsets.items():
        for pre in sorted({get_recipe(r).pretrain for r in cfg.recipes} - {""}):
            runs.append({"phase": "mtm", "recipe": pre, "budget": b, "data": sub["uri"], "epochs": cfg.mtm_epochs,
                         "out": os.path.join(os.path.abspath(cfg.out), "mtm", f"{pre}-{budget_slug(b)}")})
    return runs


def token_trials(cfg: SweepConfig, subsets: dict) -> list[dict]:
    trials = []
    for b, sub in subsets.items():
        for r in cfg.recipes:
            pre = get_recipe(r).pretrain
            init = os.path.join(os.path.abspath(cfg.out), "mtm", f"{pre}-{budget_slug(b)}") if pre else ""
            trials.append({"phase": "finetune", "kind": "tokens", "recipe": r, "budget": b, "data": sub["uri"],
                           "init": init, "epochs": cfg.epochs, "store_bytes": sub["store_bytes"],
                           "samples": sub["samples"],
                           "pct_jpeg": sub["pct_jpeg"],
                           "out": os.path.join(os.path.abspath(cfg.out), "trials", f"{r}-{budget_slug(b)}")})
    return trials


def run_overrides(cfg: SweepConfig, trial: dict) -> dict:
    """The config fields a sweep sets on a recipe: its data, run dir, length and one worker per trial."""
    over = {"data": trial["data"], "out": trial["out"], "epochs": trial["epochs"], "num_workers": 1,
            "max_steps": cfg.max_steps, "max_failures": 0}
    if trial.get("init"):
        over["init"] = trial["init"]
    if trial.get("eval_data"):  # pixel baselines: the validation split stored the same way
        over["eval_data"] = trial["eval_data"]
    elif cfg.eval_data and trial["phase"] == "finetune":
        over["eval_data"] = cfg.eval_data
    if cfg.model_args:
        over["model_args"] = {**get_recipe(trial["recipe"]).model_args, **cfg.model_args}
    return over
