"""The whole embedded pipeline at smoke size, then `sdsup.sample` on its workdir.

One training run (module fixture) serves every test here; it is the
`configs/scenes.py:smoke` config end to end: data -> vae -> ldm -> layout
(text -> label map, with its evaluation) -> planner (text -> object plan; every later layout is
planned) -> discriminator (pretraining) -> control (with adversarial
supervision) -> evalseg -> evaluate. The ablation runs on top of it
(`--from_workdir`), adding the plain-conditioner baseline.
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

import smoke_workdir
from sdsup.data import scenes

STAGES = ("data", "vae", "ldm", "layout", "planner", "discriminator", "control", "evalseg", "evaluate")
VARIANTS = ("text_only", "control", "text_layout_image")
LAYOUT_KEYS = ("layout/miou_map", "layout/miou_sample_mean", "layout/miou_majority", "layout/miou_retrieval",
               "layout/miou_oracle", "layout/relation_accuracy")


_run = smoke_workdir.run_module


@pytest.fixture(scope="module")
def workdir(smoke_run):
    return smoke_run[0]  # shared with other files (tests/smoke_workdir.py): read-only here


def test_every_stage_finished_with_its_outputs(workdir):
    for stage in STAGES:
        assert (workdir / stage / "DONE.json").exists(), stage
    for picture in ("data/preview.png", "vae/reconstructions.png", "ldm/samples.png", "control/samples.png"):
        assert (workdir / picture).stat().st_size > 1000, picture
    for model in ("vae/model", "ldm/unet", "ldm/text_encoder", "layout/model", "planner/model", "discriminator/model",
                  "control/controlnet", "evalseg/model"):
        assert (workdir / model / "params.safetensors").exists(), model
    metrics = json.loads((workdir / "metrics.json").read_text())
    for key in LAYOUT_KEYS + tuple(k + "/val" for k in LAYOUT_KEYS):
        assert 0.0 <= metrics[key] <= 1.0, key
    # The oracle (ground truth at the model's resolution: 16x16 for 32x32 images here) bounds what a map
    # at that resolution can score; small things lose pixels to the block vote, hence not ~1.
    assert metrics["layout/miou_oracle"] > 0.6 and metrics["layout/miou_oracle"] >= metrics["layout/miou_map"]
    report = (workdir / "report.md").read_text()
    assert "miou_retrieval" in report and "layout/report_novel.png" in report
    for picture in ("layout/samples.png", "layout/report_test.png", "layout/report_novel.png", "planner/samples.png",
                    "planner/report_test.png"):
        assert (workdir / picture).stat().st_size > 1000, picture
    # The planned layouts' evaluation, with the facts the maps hold, beside the layout model's own.
    for stage in ("layout", "planner"):
        for method in ("map", "sample", "retrieval"):
            assert 0.0 <= metrics[f"{stage}/faith_{method}/facts"] <= 1.0, (stage, method)
        assert 0.0 <= metrics[f"{stage}/miou_sample_mean"] <= 1.0
    assert "## Text -> layout with the object planner" in report
    planner = json.loads((workdir / "planner" / "DONE.json").read_text())
    assert planner["bank_shapes"] > 0 and planner["steps"] == 10
    control = json.loads((workdir / "control" / "DONE.json").read_text())
    assert control["lambda_adv"] > 0 and control["compile_s"] > 0
    assert control["discriminator_init"] == "stage"  # the adversary starts pretrained, as ALDM's
    # The evaluate stage: every variant's image metrics, the ceiling, pictures and the report section.
    for v in VARIANTS:
        for m in ("image_miou", "layout_miou"):
            assert 0.0 <= metrics[f"images/{v}/{m}"] <= 1.0, (v, m)
        assert metrics[f"images/{v}/fid_segfeat"] >= 0 and metrics[f"images/{v}/examples"] == 8
        assert (workdir / "evaluation" / f"samples_{v}.png").stat().st_size > 1000
    assert metrics["images/control/image_miou"] == metrics["images/control/layout_miou"]  # same (true) layout
    assert 0.0 <= metrics["images/real/miou"] <= 1.0 and metrics["images/clip_skipped"] == 1.0
    assert "## Images" in report and "evaluation/per_class_iou.png" in report and "sdsup.train" in report
    # Faithfulness: every variant, the sampled layouts, real images and the ground truth (the check's ceiling),
    # and the paired differences against text_only.
    assert metrics["images/ground_truth/faith/facts"] >= 0.9
    for row in VARIANTS + ("real", "text_layout_image/layout"):
        prefix = f"images/{row}_faith" if row.endswith("/layout") else f"images/{row}/faith"
        assert 0.0 <= metrics[f"{prefix}/facts"] <= 1.0 and metrics[f"{prefix}/facts_checked"] > 0, row
    diff = {k: metrics[f"images/text_layout_image/faith_vs_text_only/{k}"] for k in ("difference", "ci_low", "ci_high")}
    assert diff["ci_low"] <= diff["difference"] <= diff["ci_high"]
    assert "## Faithfulness" in report and "evaluation/faithfulness_examples.png" in report
    for picture in ("faithfulness.png", "faithfulness_examples.png"):
        assert (workdir / "evaluation" / picture).stat().st_size > 1000, picture
    assert (workdir / "evaluation" / "per_class_iou.png").stat().st_size > 1000
    # TensorBoard event files with the losses.
    assert list((workdir / "control").glob("events.out.tfevents.*"))


def test_rerun_skips_finished_stages(workdir, tmp_path):
    copy = smoke_workdir.copy_workdir(workdir, tmp_path / "wd")
    result = _run("sdsup.train", "--config=configs/scenes.py:smoke", f"--workdir={copy}",
                  f"--config.data.data_dir={workdir.parent / 'tfds'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("finished earlier") == len(STAGES)


def test_sample_with_and_without_a_layout(workdir, tmp_path):
    example = scenes.make_example(0, "test", 3, 32)
    np.save(tmp_path / "layout.npy", example["label"])
    out = tmp_path / "with_layout"
    result = _run("sdsup.sample", f"--workdir={workdir}", f"--prompt={example['caption']}", f"--out={out}",
                  f"--layout={tmp_path / 'layout.npy'}", "--num_samples=2", "--steps=4", "--solver=dpm_solver_pp_2m")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("image_0.png", "image_1.png", "layout.npy", "layout.png"):
        assert (out / name).exists(), name
    assert np.asarray(Image.open(out / "image_0.png")).shape == (32, 32, 3)
    assert np.array_equal(np.load(out / "layout.npy"), example["label"])

    text_only = tmp_path / "text_only"
    result = _run("sdsup.sample", f"--workdir={workdir}", "--prompt=sky over snow. a tree on the left.",
                  f"--out={text_only}", "--steps=4", "--seed=3", "--num_samples=2")
    assert result.returncode == 0, result.stderr[-3000:]
    # Text -> layout -> image: one generated map per image.
    for i in range(2):
        assert (text_only / f"image_{i}.png").exists() and (text_only / f"layout_{i}.png").exists()
        ids = np.load(text_only / f"layout_{i}.npy")
        assert ids.shape == (32, 32) and ids.max() < len(scenes.CLASS_NAMES)


def test_layout_only_and_the_most_probable_map(workdir, tmp_path):
    out = tmp_path / "maps"
    result = _run("sdsup.sample", f"--workdir={workdir}", "--prompt=sky over sand. a rock on the left.",
                  f"--out={out}", "--layout_only", "--layout_mode=map", "--num_samples=2", "--layout_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["layout_0.npy", "layout_0.png", "layout_1.npy", "layout_1.png"]
    # The most probable map does not depend on the seed: both samples are the same map.
    assert np.array_equal(np.load(out / "layout_0.npy"), np.load(out / "layout_1.npy"))


def test_unknown_words_and_over_long_prompts_warn_and_still_give_maps(workdir, tmp_path):
    out = tmp_path / "odd"
    prompt = "a purple zebra beside the skyscraper. " + "sky over grass. " * 30
    result = _run("sdsup.sample", f"--workdir={workdir}", f"--prompt={prompt}", f"--out={out}", "--layout_only",
                  "--layout_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "zebra" in result.stderr and "truncated" in result.stderr  # one warning each, no crash
    assert np.load(out / "layout_0.npy").shape == (32, 32)


def test_palette_png_layout_round_trips(workdir, tmp_path):
    from sdsup import inference, viz
    from sdsup.data import registry

    label = scenes.make_example(0, "validation", 1, 32)["label"]
    path = tmp_path / "colour.png"
    viz.save_png(viz.colorize(label, registry.SCENES.palette), str(path))
    assert np.array_equal(inference.load_layout(str(path), registry.SCENES, 32), label)


@pytest.mark.parametrize("case, message", [
    ("empty_prompt", "the prompt is empty"),
    ("corrupt_png", "cannot read layout"),
    ("bad_ids", "outside the 13 classes"),
    ("wrong_size", "this model needs 32x32"),
    ("not_a_workdir", "has no config.json"),
    ("layout_and_layout_only", "cannot be combined with --layout"),
    ("bad_layout_steps", "--layout_steps must be at least 1"),
])
def test_sample_errors_are_one_clear_line(workdir, tmp_path, case, message):
    args = [f"--workdir={workdir}", "--prompt=sky over grass.", f"--out={tmp_path / 'out'}"]
    if case == "empty_prompt":
        args[1] = "--prompt=   "
    elif case == "corrupt_png":
        (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
        args.append(f"--layout={tmp_path / 'bad.png'}")
    elif case == "bad_ids":
        np.save(tmp_path / "ids.npy", np.full((32, 32), 40, np.uint8))
        args.append(f"--layout={tmp_path / 'ids.npy'}")
    elif case == "wrong_size":
        np.save(tmp_path / "small.npy", np.zeros((16, 16), np.uint8))
        args.append(f"--layout={tmp_path / 'small.npy'}")
    elif case == "not_a_workdir":
        args[0] = f"--workdir={tmp_path}"
    elif case == "layout_and_layout_only":
        np.save(tmp_path / "ids.npy", np.zeros((32, 32), np.uint8))
        args += [f"--layout={tmp_path / 'ids.npy'}", "--layout_only"]
    elif case == "bad_layout_steps":
        args += ["--layout_only", "--layout_steps=0"]
    result = _run("sdsup.sample", *args)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_evaluate_cli_on_a_copy(workdir, tmp_path):
    copy = tmp_path / "wd"
    shutil.copytree(workdir, copy, symlinks=True)
    # 8 examples: the run's own evaluation batch, so the samplers come from the compilation cache.
    result = _run("sdsup.evaluate", f"--workdir={copy}", "--variants=control", "--examples=8", "--split=validation")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "images/control/image_miou:" in result.stdout and result.stdout.strip().endswith("report.md")
    metrics = json.loads((copy / "metrics.json").read_text())
    assert metrics["images/control/examples"] == 8
    assert "layout/miou_map" in metrics  # earlier evaluations stay
    assert "Split: validation" in (copy / "report.md").read_text()


def test_sampler_sweeps_planned_and_plain_layouts_and_image_settings(workdir, tmp_path):
    out = tmp_path / "layouts"
    result = _run("sdsup.experiments.layout_sampling", f"--workdir={workdir}", f"--out={out}", "--examples=8",
                  "--planner=both", "--plan_temperature=1,0")
    assert result.returncode == 0, result.stderr[-3000:]
    entries = json.loads((out / "layout_sampling.json").read_text())["entries"]
    # Without the planner: the most probable map and the configured sampler; with it, each at two temperatures.
    assert sorted(e["planned"] for e in entries) == [False, False, True, True, True, True]
    assert all(0.0 <= e["facts"] <= 1.0 for e in entries)
    out = tmp_path / "images"
    before = (workdir / "metrics.json").read_bytes()
    result = _run("sdsup.experiments.image_sampling", f"--workdir={workdir}", f"--out={out}", "--examples=8",
                  "--guidance=1,3", "--conditioning_scale=1")
    assert result.returncode == 0, result.stderr[-3000:]
    entries = json.loads((out / "image_sampling.json").read_text())["entries"]
    assert sorted(e["guidance"] for e in entries) == [1.0, 3.0] and sum(e["config"] for e in entries) == 1
    assert all(0.0 <= e["facts"] <= 1.0 and e["fid_segfeat"] >= 0 for e in entries)
    assert "| guidance | conditioning scale |" in (out / "image_sampling.md").read_text()
    assert (workdir / "metrics.json").read_bytes() == before  # a sweep never rewrites the run's metrics


@pytest.mark.parametrize("args, message", [
    (["--examples=1"], "--examples must be at least 2"),
    (["--variants=nonsense"], "unknown variants"),
])
def test_evaluate_cli_errors(workdir, tmp_path, args, message):
    copy = tmp_path / "wd"
    shutil.copytree(workdir, copy, symlinks=True)
    result = _run("sdsup.evaluate", f"--workdir={copy}", *args)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last.startswith("error: ") and message in last, result.stderr[-2000:]


def test_ablation_on_top_of_the_run(workdir, tmp_path):
    out = tmp_path / "ablation"
    result = _run("sdsup.experiments.ablation", "--config=configs/scenes.py:smoke", f"--workdir={out}",
                  f"--from_workdir={workdir}", "--seeds=1", f"--config.data.data_dir={workdir.parent / 'tfds'}")
    assert result.returncode == 0, result.stderr[-4000:]
    ablation = json.loads((out / "ablation.json").read_text())
    assert set(ablation["variants"]) == {"text_only", "control", "aldm", "text_layout_image"}
    for v, metrics in ablation["variants"].items():
        assert {"fid", "image_miou", "layout_miou", "faith_facts", "faith_object"} <= set(metrics)
        for m in metrics.values():
            assert set(m) == {"mean", "std", "values"} and len(m["values"]) == 1 and m["std"] == 0.0
    assert set(ablation["target"]) >= {"image_miou_gain", "fid_ratio", "met"}
    # The run's own conditioner is the aldm variant; only the lambda_adv = 0 baseline was trained.
    assert (out / "runs" / "control_s0" / "control" / "DONE.json").exists()
    assert not (out / "runs" / "aldm_s0").exists()
    assert json.loads((out / "runs" / "control_s0" / "control" / "DONE.json").read_text())["lambda_adv"] == 0.0
    assert set(ablation["faithfulness"]["vs_text_only"]) == {"control", "aldm", "text_layout_image"}
    assert 0.0 <= ablation["faithfulness"]["sampled_layouts"]["facts"] <= 1.0
    report = (out / "report.md").read_text()
    assert "## Faithfulness" in report and "| text_layout_image | " in report.split("## Faithfulness")[1]
    for v in ablation["variants"]:
        assert f"| {v} |" in report
    assert "## Discussion" in report and "One seed only" in report
    for picture in ("pictures/samples.png", "pictures/per_class_iou.png"):
        assert (out / picture).stat().st_size > 1000, picture
