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


PROTOCOLS = ("steps", "epochs")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    out: str = "runs/sweep"
    data: str = ""  # token training set; "" = the embedded CIFAR-10 tokens
    eval_data: str = ""  # token validation set; "" = the embedded validation split
    images: str = ""  # raw images (same source as the tokens): pixel baselines and corrupted-val robustness
    budgets: tuple = ("100%", "30%", "10%")
    recipes: tuple = ("cifar_seit", "cifar_seit_mtm", "cifar_seitpp_nomtm", "cifar_seitpp")
    pixel_sizes: tuple = (32, 16, 8)  # pixel baselines: per budget, the best (size, quality) that fits its bytes
    full_pixels: bool = True  # with images: the full-pixel reference (method pixels-full), the 100% row
    full_pixel_quality: int = 75  # its JPEG quality: the CIFAR source files' own (their quantization tables)
    # "steps": every budget trains the same optimizer steps (a 10% subset gets 10x the epochs); "epochs": the
    # same epochs (a 10% subset gets a tenth of the steps)
    protocol: str = "steps"
    epochs: float = 3.0  # fine-tuning epochs: of every trial ("epochs"), of the full set ("steps", unless steps)
    mtm_epochs: float = 3.0
    steps: int = 0  # "steps": fine-tuning steps of every trial; 0 = epochs x the full set's steps per epoch
    mtm_steps: int = 0
    max_steps: int = 0  # > 0 caps every run (smoke test)
    # "steps": validations per fine-tuning run, evenly spaced (at every epoch end a 10% subset would validate
    # ~50 times in 780 steps, a third of its time)
    validations: int = 8
    model_args: dict = dataclasses.field(default_factory=dict, hash=False)  # shared width/depth overrides
    concurrent: int = 2  # trials at once (each one Ray Train worker)
    use_gpu: bool = False  # one (share of a) GPU per trial, bf16 autocast
    trials_per_gpu: int = 1  # > 1: fractional GPUs (1 / trials_per_gpu each), trials packed on a GPU
    asha: bool = False
    # --space: the searched config keys (tokray.sweep.space.Param), each token trial becomes num_samples trials
    space: tuple = ()
    num_samples: int = 1
    search: str = "random"
    corruption_severity: int = 3
    eval_limit: int = 0  # > 0: corrupted-val evaluation on the first N images only
    seed: int = 0
    # --config/--set of jobs/sweep.py: (key, value, where) applied to every token fine-tuning trial's recipe
    overrides: tuple = ()
    mlflow: str = ""  # --mlflow: every trial logs its params and metrics there
    ingest: str = "auto"  # --ingest: every trial's training ingest mode (tokray.data.ingest)

    def __post_init__(self):
        from tokray.storage.budget import Budget
        from tokray.sweep.space import SEARCHES, Param

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
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol {self.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        if self.search not in SEARCHES:
            raise ValueError(f"--search {self.search!r}: choose one of {', '.join(SEARCHES)}")
        for name in ("steps", "mtm_steps", "max_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("num_samples", "trials_per_gpu", "concurrent", "validations"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        # (plans travel to the trials as dicts: the space comes back as Param objects)
        object.__setattr__(self, "space", tuple(p if isinstance(p, Param) else Param(**p) for p in self.space))


# --preset: the default sweep (cpu: hours on 2 cores) or the same at paper-like length on GPUs: hundreds of
# epochs of the full set per trial, four trials sharing each GPU (fractional GPUs), bf16 autocast
PRESETS = {
    "cpu": {},
    "gpu": {"protocol": "steps", "epochs": 300.0, "mtm_epochs": 400.0, "use_gpu": True, "trials_per_gpu": 4,
            "concurrent": 16},
}


def preset(name: str, **fields) -> SweepConfig:
    """The SweepConfig of preset ``name`` with ``fields`` on top."""
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}")
    return SweepConfig(**{**PRESETS[name], **fields})


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


def full_set_samples(cfg: SweepConfig) -> int:
    """Samples of the whole token training set: the steps protocol's yardstick (its epochs set the steps)."""
    from tokray.assets import default_tokens
    from tokray.storage.dataset import open_dataset

    return open_dataset(cfg.data or default_tokens("train")).manifest.num_samples


def run_length(cfg: SweepConfig, recipe: str, full_samples: int, mtm: bool = False) -> dict:
    """{"epochs", "steps"} of one run: the same epochs everywhere, or the same optimizer steps everywhere."""
    epochs = cfg.mtm_epochs if mtm else cfg.epochs
    if cfg.protocol == "epochs":
        return {"epochs": epochs, "steps": 0}
    steps = cfg.mtm_steps if mtm else cfg.steps
    if not steps:  # the full set's epochs, as steps: a 10% subset then runs 10x the epochs
        steps = max(1, int(epochs * max(1, full_samples // get_recipe(recipe).batch_size)))
    return {"epochs": 0.0, "steps": steps}


def mtm_runs(cfg: SweepConfig, subsets: dict, full_samples: int) -> list[dict]:
    """One MTM pre-training per (budget, MTM recipe named by a swept recipe's ``pretrain``)."""
    runs = []
    for b, sub in subsets.items():
        for pre in sorted({get_recipe(r).pretrain for r in cfg.recipes} - {""}):
            runs.append({"phase": "mtm", "recipe": pre, "budget": b, "data": sub["uri"],
                         **run_length(cfg, pre, full_samples, mtm=True),
                         "out": os.path.join(os.path.abspath(cfg.out), "mtm", f"{pre}-{budget_slug(b)}")})
    return runs


def token_trials(cfg: SweepConfig, subsets: dict, full_samples: int) -> list[dict]:
    trials = []
    for b, sub in subsets.items():
        for r in cfg.recipes:
            pre = get_recipe(r).pretrain
            init = os.path.join(os.path.abspath(cfg.out), "mtm", f"{pre}-{budget_slug(b)}") if pre else ""
            trials.append({"phase": "finetune", "kind": "tokens", "recipe": r, "method": r, "budget": b,
                           "data": sub["uri"], "init": init, **run_length(cfg, r, full_samples),
                           "store_bytes": sub["store_bytes"], "samples": sub["samples"], "pct_jpeg": sub["pct_jpeg"],
                           "out": os.path.join(os.path.abspath(cfg.out), "trials", f"{r}-{budget_slug(b)}")})
    return trials


def run_order(cfg: SweepConfig, trials: list[dict]) -> list[dict]:
    """The order fine-tuning trials start in: the full-pixel reference, then budget by budget as given (largest
    first by default), token recipes before their pixel baseline; a sweep stopped part-way then has whole rows
    for its first budgets and the ratio to full pixels."""
    rank = {b: i for i, b in enumerate(cfg.budgets)}
    return sorted(trials, key=lambda t: (t.get("method") != "pixels-full", rank.get(t["budget"], len(rank)),
                                         t["kind"] != "tokens"))


def run_overrides(cfg: SweepConfig, trial: dict) -> dict:
    """The config fields a sweep sets on a recipe: its data, run dir, length and one worker per trial."""
    steps = trial.get("steps") or 0
    cap = min(steps, cfg.max_steps) if steps and cfg.max_steps else steps or cfg.max_steps
    over = {"data": trial["data"], "out": trial["out"], "epochs": trial["epochs"], "num_workers": 1,
            "max_steps": cap, "max_failures": 0, "ingest": cfg.ingest}
    if steps and trial["phase"] == "finetune":
        over["val_every"] = -(-steps // cfg.validations)
    if cfg.use_gpu:
        over.update(use_gpu=True, amp=True, gpus_per_worker=1.0 / cfg.trials_per_gpu)
    if trial.get("init"):
        over["init"] = trial["init"]
    if trial.get("eval_data"):  # pixel baselines: the validation split stored the same way
        over["eval_data"] = trial["eval_data"]
    elif cfg.eval_data and trial["phase"] == "finetune":
        over["eval_data"] = cfg.eval_data
    if cfg.model_args:
        over["model_args"] = {**get_recipe(trial["recipe"]).model_args, **cfg.model_args}
    return over
