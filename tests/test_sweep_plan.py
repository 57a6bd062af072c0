"""What a sweep plans, without running it: the step-matched protocol, the GPU preset, search spaces (refused
before any trial when wrong), the full-pixel reference and the results of a search."""

import csv
import dataclasses

import numpy as np
import pytest

from conftest import run_job, write_image_folder
from tokray.recipes import get_recipe
from tokray.sweep.plan import SweepConfig, mtm_runs, preset, run_overrides, token_trials
from tokray.sweep.space import load_space, sampled_overrides
from tokray.train.schedule import total_steps

FULL = 39_997  # the embedded CIFAR-10 training tokens
SUBSETS = {b: {"uri": f"/data/tokens-{b}", "samples": n, "store_bytes": n * 72, "pct_jpeg": n / 500}
           for b, n in (("100%", FULL), ("30%", 11_918), ("10%", 3_942))}


def _configs(cfg: SweepConfig):
    """Every run of the plan as the TrainConfig its trial builds, with its sample count."""
    runs = mtm_runs(cfg, SUBSETS, FULL) + token_trials(cfg, SUBSETS, FULL)
    for run in runs:
        yield run, dataclasses.replace(get_recipe(run["recipe"]), **run_overrides(cfg, run)), SUBSETS[run["budget"]]


def test_step_matched_protocol_trains_every_budget_the_same_steps():
    cfg = SweepConfig(recipes=("cifar_seit", "cifar_seitpp"))
    assert cfg.protocol == "steps"  # the default
    steps = {}
    for run, train, sub in _configs(cfg):
        per_epoch, total = total_steps(train, sub["samples"])
        steps.setdefault(run["phase"], set()).add(total)
        assert total / per_epoch == pytest.approx(3 * (FULL // 256) / (sub["samples"] // 256))  # 10%: ~10x the epochs
    assert steps == {"mtm": {3 * (FULL // 256)}, "finetune": {3 * (FULL // 256)}}

    fixed = SweepConfig(recipes=("cifar_seitpp",), steps=780, mtm_steps=500)
    assert {r: {total_steps(t, s["samples"])[1] for x, t, s in _configs(fixed) if x["phase"] == r}
            for r in ("mtm", "finetune")} == {"mtm": {500}, "finetune": {780}}
    # every fine-tuning run validates 8 times, whatever its epochs (a 10% subset: not at each of its ~50 ends)
    assert {x["phase"]: t.val_every for x, t, s in _configs(fixed)} == {"mtm": 0, "finetune": 98}

    epochs = SweepConfig(recipes=("cifar_seit",), protocol="epochs")  # today's: same epochs, fewer steps
    totals = {b: total_steps(t, s["samples"])[1] for _, t, s in _configs(epochs) for b in [s["uri"]]}
    assert totals["/data/tokens-100%"] == 3 * (FULL // 256) and totals["/data/tokens-10%"] == 3 * (3_942 // 256)
    assert {t.val_every for _, t, _ in _configs(epochs)} == {0}  # at every epoch end
    with pytest.raises(ValueError, match="--protocol 'days'"):
        SweepConfig(protocol="days")


def test_gpu_preset_plans_paper_length_trials_packed_on_gpus_in_bf16():
    cfg = preset("gpu", recipes=("cifar_seit", "cifar_seitpp"))
    assert (cfg.protocol, cfg.use_gpu, cfg.trials_per_gpu) == ("steps", True, 4) and cfg.concurrent >= 4
    runs = list(_configs(cfg))
    assert len(runs) == 3 + 6  # one shared MTM (cifar_seitpp_mtm) per budget, 2 recipes x 3 budgets
    for run, train, sub in runs:
        assert train.use_gpu and train.amp and train.gpus_per_worker == 0.25 and train.num_workers == 1
        want = (400 if run["phase"] == "mtm" else 300) * (FULL // 256)
        assert total_steps(train, sub["samples"])[1] == want  # hundreds of full-set epochs, at every budget
    cpu = preset("cpu")
    assert not cpu.use_gpu and "use_gpu" not in run_overrides(cpu, runs[0][0])
    with pytest.raises(ValueError, match="--preset 'tpu'"):
        preset("tpu")


def _space(tmp_path, text: str) -> str:
    path = tmp_path / f"space-{len(list(tmp_path.glob('space-*')))}.yaml"
    path.write_text(text)
    return str(path)


def test_space_samplers_resolve_to_config_values(tmp_path):
    path = _space(tmp_path, "lr: {loguniform: [1e-4, 3.0e-3]}\nlayer_decay: {grid: [0.65, 0.75]}\naugment.noise_prob: "
                            "{uniform: [0.0, 0.5]}\naugment:\n  rrc_scale: {choice: [[0.35, 1.0], [0.6, 1.0]]}\n")
    params = load_space(path, ("cifar_seit", "cifar_seitpp"))
    assert [p.key for p in params] == ["lr", "layer_decay", "augment.noise_prob", "augment.rrc_scale"]
    sample = {"lr": 5e-4, "layer_decay": 0.65, "augment.noise_prob": 0.3, "augment.rrc_scale": params[-1].values[1]}
    from tokray.overrides import apply_overrides

    cfg = apply_overrides(get_recipe("cifar_seitpp"), sampled_overrides(sample, params))
    assert (cfg.lr, cfg.layer_decay, cfg.augment.noise_prob, cfg.augment.rrc_scale) == (5e-4, 0.65, 0.3, (0.6, 1.0))

    # SeiT++ without TokenAdapt has no f-space Mixup: settings that go together are one choice of mappings
    with pytest.raises(ValueError, match="recipe cifar_seitpp refuses the corner augment.tokenadapt=False: augment.mixup_alpha needs tokenadapt"):
        load_space(_space(tmp_path, "augment.tokenadapt: {choice: [true, false]}\n"), ("cifar_seitpp",))
    (off,) = load_space(_space(tmp_path, "augment: {choice: [{tokenadapt: true}, {tokenadapt: false, mixup_alpha: 0}]}"
                                         "\n"), ("cifar_seit", "cifar_seitpp"))
    cfg = apply_overrides(get_recipe("cifar_seitpp"), sampled_overrides({"augment": off.values[1]}, [off]))
    assert (cfg.augment.tokenadapt, cfg.augment.mixup_alpha, cfg.augment.cutmix_alpha) == (False, 0.0, 1.0)
    with pytest.raises(ValueError, match="--search grid enumerates values; lr, augment.noise_prob use a range"):
        load_space(path, ("cifar_seit",), search="grid")
    with pytest.raises(ValueError, match="cannot enumerate a grid; use choice for layer_decay"):
        load_space(path, ("cifar_seit",), search="optuna")


def test_space_with_unknown_or_impossible_settings_is_refused_before_any_trial(tmp_path):
    bad = _space(tmp_path, "augment.colour_prob: {uniform: [0.0, 0.5]}\nlr: {choice: [1.0e-3]}\n")
    with pytest.raises(ValueError, match=r"unknown config field 'augment.colour_prob' \(did you mean "
                                         r"'augment.coloradapt_prob'\?\) in --space .*valid augment fields: .*noise_prob"):
        load_space(bad, ("cifar_seit",))
    out = tmp_path / "sweep"
    res = run_job("jobs/sweep.py", "--smoke-test", "--space", bad, "--out", str(out), timeout=120)
    assert res.returncode == 2 and "unknown config field 'augment.colour_prob'" in res.stderr, res.stderr[-2000:]
    assert "coloradapt_prob" in res.stderr and not (out / "tune").exists()  # no trial started

    both = _space(tmp_path, "augment.noise_prob: {uniform: [0.5, 1.0]}\naugment.coloradapt_prob: {choice: [0.0, 0.5]}\n")
    with pytest.raises(ValueError, match=r"cifar_seitpp refuses the corner augment.noise_prob=1.0, augment.coloradapt_prob=0.5: augment.noise_prob \+ "
                                         r"coloradapt_prob must be <= 1"):
        load_space(both, ("cifar_seitpp",))
    with pytest.raises(ValueError, match=r"'lr' needs one sampler, one of choice, grid"):
        load_space(_space(tmp_path, "lr: 0.001\n"), ("cifar_seit",))


def test_results_of_a_search_have_a_column_per_key_the_best_setting_per_budget_and_the_reference(tmp_path):
    from tokray.sweep.report import write_results

    def tok(budget, top1, lr, prob, recipe="cifar_seit", n=1000):
        return {"kind": "tokens", "recipe": recipe, "method": recipe, "budget": budget, "store_bytes": n,
                "val_top1": top1, "step": 780, "epoch": 5.0, "space": {"lr": lr, "augment.tokenadapt": prob}}

    trials = [tok("100%", 50.0, 1e-3, True), tok("100%", 55.0, 2e-3, False), tok("10%", 30.0, 1e-3, False, n=100),
              tok("10%", 33.0, 2e-3, True, n=100),
              {"kind": "pixels", "recipe": "cifar_pixels", "method": "pixels-full", "budget": "100%", "size": 32,
               "quality": 75, "store_bytes": 30_000, "jpeg_bytes": 36_000, "samples": 400, "val_top1": 60.0,
               "step": 780},
              {"kind": "pixels", "recipe": "cifar_pixels", "method": "pixels 16px q50", "budget": "10%", "size": 16,
               "quality": 50, "store_bytes": 95, "val_top1": 31.0, "step": 780}]
    res = write_results(trials, str(tmp_path), protocol="steps")
    rows = list(csv.DictReader(open(res["csv"])))
    assert {"budget", "method", "protocol", "steps", "store_bytes", "top1", "lr", "augment.tokenadapt"} <= set(rows[0])
    assert rows[0]["method"] == "pixels-full" and rows[0]["jpeg_bytes"] == "36000"  # the 100% row, first
    assert {r["protocol"] for r in rows} == {"steps"} and {r["steps"] for r in rows} == {"780"}
    md = open(res["md"]).read()
    assert "top-1 60.00% on 36,000 bytes as the JPEG files, 30,000 bytes as the compact pixel store" in md
    pivot = md.split("Top-1 by budget:")[1].split("Best setting")[0]
    assert "| 100% | 55.00 | - | - | 91.7% |" in pivot and "| 10% | 33.00 | 31.00 (16px q50) | +2.00 | 55.0% |" in pivot
    best = md.split("Best setting per budget:")[1]
    assert "| budget | method | samples searched | top1 | lr | augment.tokenadapt |" in best
    assert "| 100% | cifar_seit | 2 | 55.00 | 0.002 | False |" in best and "| 10% | cifar_seit | 2 | 33.00 | 0.002 | True |" in best
    assert (tmp_path / "results-space.png").stat().st_size > 0 and res["space_png"].endswith("results-space.png")


def test_full_pixel_reference_is_every_training_image_at_its_own_size(tmp_path):
    from tokray.data.images import ImageSource
    from tokray.data.splits import validation_split
    from tokray.sweep.pixels import full_pixel_trial

    (tmp_path / "imgs").mkdir()
    images = write_image_folder(tmp_path / "imgs", per_class=10, size=32)
    cfg = SweepConfig(out=str(tmp_path / "sweep"), images=images, recipes=("cifar_seit",))
    ids = np.flatnonzero(~validation_split(ImageSource(images).labels))  # the training split, as tokenized
    t = full_pixel_trial(cfg, 40_000, ids=ids)
    assert (t["method"], t["budget"], t["size"], t["quality"], t["samples"]) == ("pixels-full", "100%", 32, 75, len(ids))
    assert t["jpeg_bytes"] == ImageSource(images).file_bytes(ids) and t["store_bytes"] > 0
    assert t["steps"] == 3 * (40_000 // 256) and t["eval_data"].endswith("pixels-val-32px-q75")
    assert full_pixel_trial(cfg, 40_000, ids=ids) == t  # a rerun reuses the written stores


def test_an_interrupted_or_failed_phase_stops_the_sweep_before_the_next():
    """Tune's fit() returns after a SIGINT: unfinished trials must not let fine-tuning start on half-trained MTM."""
    from tokray.sweep.run import _stop_if_interrupted, require_finished

    class Grid(list):  # what _stop_if_interrupted reads of Ray's ResultGrid: its length and two counts
        def __init__(self, statuses):
            super().__init__(statuses)
            self.num_terminated, self.num_errors = statuses.count("TERMINATED"), statuses.count("ERROR")

    _stop_if_interrupted("mtm", Grid(["TERMINATED", "TERMINATED", "ERROR"]))  # finished (or ASHA-stopped) and failed
    with pytest.raises(KeyboardInterrupt, match="mtm: 1 trials unfinished"):
        _stop_if_interrupted("mtm", Grid(["TERMINATED", "RUNNING"]))
    require_finished([{"out": "/s/mtm/a", "done": True}], "MTM pre-training")
    with pytest.raises(ValueError, match="MTM pre-training /s/mtm/b failed .*rerun the same command"):
        require_finished([{"out": "/s/mtm/a", "done": True}, {"out": "/s/mtm/b", "error": "OOM"}], "MTM pre-training")
    with pytest.raises(ValueError, match="MTM pre-training /s/mtm/c did not finish"):
        require_finished([{"out": "/s/mtm/c", "step": 400}], "MTM pre-training")


def test_trials_start_with_the_full_pixel_reference_then_budget_by_budget():
    """A sweep stopped part-way has the reference and whole rows for its largest budgets."""
    from tokray.sweep.plan import run_order

    cfg = SweepConfig(recipes=("cifar_seit", "cifar_seitpp"))
    pixels = [{"kind": "pixels", "budget": b, "method": "pixels 32px"} for b in ("100%", "30%", "10%")]
    trials = token_trials(cfg, SUBSETS, FULL) + pixels + [{"kind": "pixels", "budget": "100%", "method": "pixels-full"}]
    per_budget = ["cifar_seit", "cifar_seitpp", "pixels 32px"]
    assert [(t["budget"], t["method"]) for t in run_order(cfg, trials)] == \
        [("100%", "pixels-full")] + [(b, m) for b in ("100%", "30%", "10%") for m in per_budget]


def test_the_full_pixel_reference_is_its_own_experiment():
    """Adding the reference to a finished sweep leaves the other trials' pinned list (and results) as they were."""
    from tokray.sweep.plan import run_order
    from tokray.sweep.run import split_reference

    cfg = SweepConfig(recipes=("cifar_seit",))
    rest = run_order(cfg, token_trials(cfg, SUBSETS, FULL) + [{"kind": "pixels", "budget": "10%", "method": "pixels 8px"}])
    reference, others = split_reference(run_order(cfg, rest + [{"kind": "pixels", "budget": "100%",
                                                                "method": "pixels-full"}]))
    assert [t["method"] for t in reference] == ["pixels-full"] and others == rest
    assert split_reference(rest) == ([], rest)
