"""jobs/sweep.py --smoke-test: a two-trial Ray Tune sweep writes the table (markdown, CSV) and the plot,
and a rerun restores the Tune experiments instead of training again. With the CIFAR tar present, the
second trial is a pixel baseline at matched bytes and both get top-1 under corruption."""

import csv
import json


from conftest import ROOT, run_job

CIFAR_TAR = ROOT.parent / "shared" / "datasets" / "cifar10-train.tar"


def _result(out):
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_smoke_sweep_writes_table_and_plot_and_resumes(tmp_path):
    args = ["jobs/sweep.py", "--smoke-test", "--out", str(tmp_path)]
    if CIFAR_TAR.exists():
        args += ["--images", str(CIFAR_TAR)]
    first = run_job(*args, timeout=900)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    res = _result(first)
    assert res["trials"] == 2 and res["failed"] == 0
    for ext in ("md", "csv", "png"):
        assert (tmp_path / f"results.{ext}").stat().st_size > 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 2 and all(0 <= float(r["top1"]) <= 100 for r in rows)
    assert all(int(r["store_bytes"]) > 0 for r in rows)
    if CIFAR_TAR.exists():
        tokens, pixels = sorted(rows, key=lambda r: r["method"].startswith("pixels"))
        assert pixels["method"].startswith("pixels") and int(pixels["store_bytes"]) <= int(tokens["store_bytes"])
        assert all(r["top1_gaussian_noise"] and r["top1_gaussian_blur"] for r in rows)
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# CIFAR-10 tokens vs pixels") and "Made by `python jobs/sweep.py --smoke-test" in md
    assert "| budget |" in md

    again = run_job(*args, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "restoring the Tune experiment" in again.stdout + again.stderr
    assert [r["top1"] for r in _result(again)["rows"]] == [r["top1"] for r in res["rows"]]

    # --report: the finished trials' results, written elsewhere, without running any
    report = run_job(*args, "--report", "--results-dir", str(tmp_path / "report"), timeout=900)
    assert report.returncode == 0, report.stderr[-3000:]
    assert [r["top1"] for r in _result(report)["rows"]] == [r["top1"] for r in res["rows"]]
    assert "Started training worker group" not in report.stdout + report.stderr
    assert (tmp_path / "report" / "results.csv").read_text() == (tmp_path / "results.csv").read_text()

    changed = run_job(*args, "--epochs", "2", timeout=900)
    assert changed.returncode == 2 and "started with other settings" in changed.stderr, changed.stderr[-2000:]


def test_results_table_has_top1_by_budget_with_token_lead_over_pixels(tmp_path):
    from tokray.sweep.report import write_results

    def trial(budget, nbytes, top1, recipe="", size=0):
        kind = "pixels" if size else "tokens"
        return {"kind": kind, "recipe": recipe or "cifar_pixels", "budget": budget, "store_bytes": nbytes,
                "size": size, "quality": 50, "val_top1": top1, "epoch": 3}

    trials = [trial("100%", 1000, 40.0, "seit"), trial("100%", 1000, 45.5, "seitpp"), trial("100%", 990, 42.0, size=16),
              trial("10%", 100, 20.0, "seit"), trial("10%", 100, 30.0, "seitpp"), trial("10%", 95, 31.0, size=8)]
    res = write_results(trials, str(tmp_path))
    md = open(res["md"]).read()
    pivot = md.split("Top-1 by budget:")[1]
    assert "| budget | seit | seitpp | pixels | best tokens - pixels |" in pivot
    assert "| 100% | 40.00 | 45.50 | 42.00 (16px q50) | +3.50 |" in pivot
    assert "| 10% | 20.00 | 30.00 | 31.00 (8px q50) | -1.00 |" in pivot


def test_smoke_search_writes_a_column_per_searched_key_the_best_setting_and_the_plot(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {choice: [1.0e-3, 2.0e-3]}\naugment:\n  noise_prob: {uniform: [0.0, 0.5]}\n")
    out = tmp_path / "sweep"
    # optuna + ASHA decide on val_top1; log_every=1 sends them step reports without it in between. Three samples on
    # two CPUs: the third starts only once the first two trials' CPUs are freed (ASHA stops them at the last step)
    res = run_job("jobs/sweep.py", "--smoke-test", "--budgets", "2%", "--space", str(space), "--num-samples", "3",
                  "--search", "optuna", "--asha", "--set", "log_every=1", "--out", str(out), timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert _result(res)["trials"] == 3 and _result(res)["failed"] == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 3 and {"lr", "augment.noise_prob", "protocol", "steps"} <= set(rows[0])
    assert {r["lr"] for r in rows} <= {"0.001", "0.002"} and all(0 <= float(r["augment.noise_prob"]) <= 0.5 for r in rows)
    assert {(r["protocol"], r["steps"]) for r in rows} == {("steps", "3")}
    md = (out / "results.md").read_text()
    assert "Best setting per budget:" in md and "| budget | method | samples searched | top1 | lr | augment.noise_prob |" in md
    assert (out / "results-space.png").stat().st_size > 0
    assert len({p.parent.name for p in (out / "trials" / "cifar_seit-2pct").glob("*/config.json")}) == 3  # a run dir each


KILLED_TRIAL = '''
import json, os, sys, time
import ray, ray.train
from ray.train.torch import TorchTrainer
from tokray.runtime import init_ray

def loop(config):
    open(config["started"], "w").close()
    time.sleep(600)

@ray.remote(num_cpus=0)
class Trial:
    def fit(self, started):
        TorchTrainer(loop, train_loop_config={"started": started},
                     scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1})).fit()

def cpus_reserved():
    return sum(b.get("CPU", 0) for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"
               for b in pg["bundles"].values())

init_ray(dashboard=True)
trial = Trial.remote()
trial.fit.remote(sys.argv[1])
deadline = time.time() + 180
while not os.path.exists(sys.argv[1]) and time.time() < deadline:
    time.sleep(0.5)
held = cpus_reserved()
ray.kill(trial)  # what Tune does to a trial ASHA stops: its Train controller dies with it
deadline = time.time() + 60
while cpus_reserved() > 0 and time.time() < deadline:
    time.sleep(1)
print(json.dumps({"held": held, "left": cpus_reserved()}))
'''


def test_a_killed_trials_train_workers_give_their_cpus_back(ray_session, tmp_path):
    """The sweep's Ray (init_ray(dashboard=True)), with another Ray on the machine (this session's): once a trial's
    Train controller is killed, Ray Train's cleaner frees its workers' CPUs; a search would stall without it."""
    script = tmp_path / "killed_trial.py"
    script.write_text(KILLED_TRIAL)
    res = run_job(str(script), str(tmp_path / "started"), timeout=420)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _result(res) == {"held": 1.0, "left": 0}
