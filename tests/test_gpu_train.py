"""The GPU training check (tools/gpu/gpu_train.sh, gpu_train.py, gpu_data.py) on this CPU: the whole dry run end
to end (data copy, size check, probe, plan, both runs through the CLI, tests, table), the planner, the compact copy's
encoding, and the carried-size check."""
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools", "gpu"))
import gpu_data  # noqa: E402
import gpu_train  # noqa: E402

from helpers import ACDC, needs_acdc  # noqa: E402


def fake_probe(step=0.05):
    """A probe result with the fields plan_runs reads (numbers of the order a GPU would give)."""
    kinds = {k: {"build_s": 1.0, "first_s": 5.0, "step_s": step * f} for k, f in
             zip(gpu_train.KINDS, (1.0, 1.2, 2.0, 3.0))}
    return {"kinds": kinds, "import_s": 6.0, "load_s": 3.0, "val_s": 2.0, "bn_s": 0.5, "test_volume_s": 0.4,
            "test_volumes": 40, "overlay_s": 0.5}


def test_plan_gives_both_methods_the_same_training_time_and_fits_the_budget():
    from action.config import PRESETS

    s = gpu_train.Settings()
    pr = fake_probe()
    plan = gpu_train.plan_runs(s, pr, 250.0)
    k = pr["kinds"]
    sup_train = plan["supervised_iterations"] * k["supervised"]["step_s"]
    act_train = sum(n * k[st]["step_s"] for st, n in plan["stage_iterations"].items())
    assert abs(sup_train - act_train) <= 3 * k["finetune"]["step_s"]  # equal up to rounding to whole iterations
    assert abs(sup_train - plan["train_s_per_method"]) <= k["supervised"]["step_s"]
    assert plan["predicted_s"]["total"] <= 250.0 - plan["margin_s"] + 1e-6
    share = PRESETS["action-cpu"]["stage_iterations"]
    its = plan["stage_iterations"]
    assert abs(its["pretrain-local"] / its["finetune"] - share["pretrain-local"] / share["finetune"]) < 0.01
    assert min(its.values()) >= s.min_iterations


def test_plan_refuses_a_budget_that_cannot_fit_the_minimum_and_names_the_fix():
    with pytest.raises(ValueError, match="--budget"):
        gpu_train.plan_runs(gpu_train.Settings(), fake_probe(), 60.0)


def test_dry_run_settings_cap_the_plan_at_max_iterations():
    plan = gpu_train.plan_runs(gpu_train.Settings(**gpu_train.DRY), fake_probe(), 1000.0)
    assert plan["capped"] and plan["supervised_iterations"] == gpu_train.DRY["max_iterations"]
    assert set(plan["stage_iterations"].values()) == {gpu_train.DRY["max_iterations"]}


def test_action_argv_runs_the_stage_iii_recipe_and_is_what_the_cli_parses():
    s = gpu_train.Settings()
    argv = gpu_train.action_argv(s, "data", "out", {"pretrain-global": 10, "pretrain-local": 120, "finetune": 60})
    cfg = gpu_train.config_from_argv(argv)
    assert cfg.stage == "pipeline" and cfg.size == 256 and cfg.unsup_rampup == 0
    assert (cfg.unsup_loss, cfg.unlabelled_view, cfg.cutmix_p, cfg.cutmix_pairing) == ("ce+dice", "strong", 1.0,
                                                                                       "derangement")
    assert cfg.stage_iterations == {"pretrain-global": 10, "pretrain-local": 120, "finetune": 60}
    assert cfg.bn_recalibrate == 50 and cfg.val_every == 30 and cfg.labelled_batch == 8
    sup = gpu_train.config_from_argv(gpu_train.supervised_argv(s, "data", "out", 100))
    assert sup.stage == "supervised" and sup.unlabelled_batch == 4 and not sup.test_at_end and sup.val_every == 50


def test_carried_size_counts_repository_files_and_carried_folders_and_flags_over_the_limit(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.py").write_bytes(b"x" * 1000)
    (repo / ".gitignore").write_text("big/\nbuild/\n")
    (repo / "build").mkdir()
    (repo / "build" / "ignored.so").write_bytes(b"y" * 5000)  # ignored and not carried: does not travel
    (repo / "big").mkdir()
    with open(repo / "big" / "data.bin", "wb") as fh:
        fh.truncate(65 * gpu_data.MIB)  # sparse: 65 MiB of size, no disk
    small = gpu_data.carried_size(str(repo), [])
    assert small["repository_bytes"] == 1000 + len("big/\nbuild/\n") and small["under_limit"] and small["exact"]
    big = gpu_data.carried_size(str(repo), ["big"])
    assert big["carried_bytes"] == {"big": 65 * gpu_data.MIB} and not big["under_limit"]
    assert "OVER the 64 MiB limit" in gpu_data.describe_size(big)
    with pytest.raises(FileNotFoundError, match="prepare it first"):
        gpu_data.carried_size(str(repo), ["missing"])


@needs_acdc
def test_compact_copy_keeps_labels_exactly_and_images_within_float16_rounding(tmp_path):
    from action.data import AcdcLayout, read_case

    out = tmp_path / "acdc"
    manifest = gpu_data.prepare(ACDC, str(out), labelled_patients=1, unlabelled=3, val=1, test=1, log=lambda *a: None)
    assert manifest["counts"] == {"labelled": 23, "unlabelled": 3, "val": 1, "test": 1}
    assert manifest["left_out"]["unlabelled"] == 1312 - 23 - 3 and (out / "LICENSE-DATA.md").is_file()
    copy, orig = AcdcLayout(str(out)), AcdcLayout(ACDC)
    labelled, unlabelled = copy.split(labelled_patients=1)
    orig_l, orig_u = orig.split(labelled_patients=1)
    assert labelled == orig_l and unlabelled == [orig_u[i] for i in gpu_data.evenly_spaced(len(orig_u), 3)]
    worst = 0.0
    for name in labelled[:3] + unlabelled + copy.val_volumes + copy.test_volumes:
        image, label = read_case(str(out), name)
        image0, label0 = read_case(ACDC, name)
        assert image.dtype == np.float32 and np.array_equal(label, label0)
        worst = max(worst, float(np.abs(image - image0).max()))
    assert 0 < worst <= 2.0 ** -12  # half a float16 ulp on [0.5, 1]: the images are in [0, 1]
    assert manifest["image_max_abs_error"] <= 2.0 ** -12


@pytest.mark.slow
@needs_acdc
def test_dry_run_runs_every_step_writes_every_file_and_prints_the_per_class_table_last(tmp_path):
    """Also the fallback: the Triton backend cannot run on CPU tensors outside the interpreter, so the ACTION stages
    fail in the first probe and the runs use the chunked backend, as they would after a kernel failure on a GPU."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = {**os.environ, "PYTHON": sys.executable, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu", "gpu_train.sh"), "--dry-run", "--backend",
                           "triton", "--out", str(out), "--runs", str(runs), "--source", ACDC],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["action.json", "gpu_train.log", "plan.json", "results.md", "runs.tar.gz",
                                       "supervised.json"]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert [line.split(" | ")[0] for line in lines[-4:]] == ["| RV", "| Myo", "| LV", "| mean"]
    assert all(line.count("|") == 10 and " - " not in line for line in lines[-4:])  # 1 + 2 x 4 cells, all filled
    plan = json.loads((out / "plan.json").read_text())
    assert plan["backend"] == "chunked" and plan["backend_failure"]["backend"] == "triton"
    assert set(plan["backend_failure"]["errors"]) == {"pretrain-global", "pretrain-local", "finetune"}
    assert all(plan["probe"]["kinds"][k]["step_s"] > 0 for k in gpu_train.KINDS)
    assert plan["carried"]["under_limit"] and plan["nibabel_blocked"]
    assert plan["evaluate_crosscheck"]["equal"], plan["evaluate_crosscheck"]
    for name in ("supervised", "action"):
        result = json.loads((out / f"{name}.json").read_text())
        assert result["status"] == "ok" and result["test"]["cases"] == gpu_train.DRY_DATA["test"]
    sup = json.loads((out / "supervised.json").read_text())
    assert sup["evaluate_argv"][:1] == ["evaluate"] and "--bn-source" in sup["evaluate_argv"]
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"supervised/train.csv", "supervised/test/summary.json", "action/finetune/val.csv",
            "action/finetune/test/summary.json", "action.log"} <= names
    assert not any(n.endswith(".pt") for n in names)
    blocked = subprocess.run([sys.executable, "-c", "import nibabel"], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(runs / "no_nibabel")}, check=False)
    assert blocked.returncode != 0 and "not installed on the lent GPU machine" in blocked.stderr
