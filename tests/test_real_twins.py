"""The tiny twin of configs/aldm.py:cityscapes (ADE20K's, with every stage and the export, is in
tests/test_real_configs.py), on the stages where its config differs from ADE20K's: ALDM's 20-row
discriminator head (19 classes + fake, [-1, 1] pixels), random 32x32 crops of 32x64 frames (so no latent
cache) and a DRN evaluator (`sdsup.convert drn`).

The folder's twin is tests/test_folder_twin.py.
"""

import json

import pytest

from aldm_twin import check_control, import_tiny_sd, run_twin

# Whole-frame evaluation is tested on the folder dataset (tests/test_folder_twin.py); here the DRN evaluator
# is imported and scores the real validation frames (evalseg).
STAGES = {"cityscapes": ("data", "vae", "ldm", "control", "evalseg")}


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return import_tiny_sd(tmp_path_factory.mktemp("sd"))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_the_tiny_twin_runs_its_configs_own_path(name, sd15, tmp_path):
    stages = "(" + ", ".join(repr(s) for s in STAGES[name]) + ",)"
    workdir = run_twin(name, tmp_path, sd15, f"--config.stages={stages}")
    for stage in STAGES[name]:
        assert (workdir / stage / "DONE.json").exists(), stage
    control = check_control(workdir, name)
    assert control["discriminator_init"].endswith("discriminator")
    evalseg = json.loads((workdir / "evalseg" / "DONE.json").read_text())
    assert evalseg["pretrained"].endswith("evaluator") and 0.0 <= evalseg["val_miou_real"] <= 1.0
    assert json.loads((workdir / "evalseg" / "model" / "config.json").read_text())["kind"] == "drn_segmenter"
