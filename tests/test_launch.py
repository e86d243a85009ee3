"""Launch scripts: syntax, the commands they would run, a real local multi-process run."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")


def _bash(args, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(["bash", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def test_scripts_parse():
    for name in os.listdir(LAUNCH):
        result = _bash(["-n", os.path.join(LAUNCH, name)])
        assert result.returncode == 0, (name, result.stderr)


def test_tpu_pod_dry_run_runs_sdsup_train_on_all_workers():
    env = {"DRY_RUN": "1", "TPU_NAME": "pod", "ZONE": "us-west4-a"}
    out = _bash([os.path.join(LAUNCH, "tpu_pod.sh"), "train", "--config=configs/scenes.py", "--workdir=gs://b/w"], env)
    assert out.returncode == 0, out.stderr
    assert "--worker=all" in out.stdout and "sdsup.train --distributed_auto" in out.stdout
    assert "--config=configs/scenes.py" in out.stdout
    setup = _bash([os.path.join(LAUNCH, "tpu_pod.sh"), "setup"], env)
    assert setup.returncode == 0 and ".[tpu]" in setup.stdout
    missing = _bash([os.path.join(LAUNCH, "tpu_pod.sh"), "train"], {"DRY_RUN": "1", "TPU_NAME": "", "ZONE": ""})
    assert missing.returncode != 0 and "TPU_NAME" in missing.stderr


def test_slurm_dry_run():
    env = {"DRY_RUN": "1", "CONFIG": "configs/scenes.py", "WORKDIR": "/shared/wd"}
    out = _bash([os.path.join(LAUNCH, "gpu_slurm.sbatch"), "--config.input.batch_size=64"], env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("srun python -m sdsup.train --distributed_auto")
    assert "--config.input.batch_size=64" in out.stdout


def test_local_multiprocess_runs_the_data_stage(tmp_path):
    env = {"NUM_PROCESSES": "2", "PYTHON": sys.executable, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("XLA_FLAGS", None)
    out = _bash([os.path.join(LAUNCH, "local_multiprocess.sh"), "--config=configs/scenes.py:smoke", "--only=data",
                 f"--workdir={tmp_path / 'wd'}", f"--config.data.data_dir={tmp_path / 'tfds'}",
                 "--config.data.num_train=32", "--config.data.num_validation=8", "--config.data.num_test=8"], env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "process 1/2" in out.stderr and "'data': 4" in out.stderr
    done = json.loads((tmp_path / "wd" / "data" / "DONE.json").read_text())
    assert done["splits"]["train"]["examples"] == 32


def test_aldm_launcher_prepares_then_trains_the_real_config():
    env = {"DRY_RUN": "1", "ROOT": "/shared/aldm", "DATA": "/shared/ade", "CAPTIONS": "/shared/c.json",
           "SD_PIPELINE": "/models/sd-v1-5", "CSAIL_DIR": "/models/csail", "TPU_NAME": "pod", "ZONE": "z"}
    script = os.path.join(LAUNCH, "aldm.sh")
    prepare = _bash([script, "ade20k", "prepare"], env)
    assert prepare.returncode == 0, prepare.stderr
    lines = prepare.stdout.splitlines()
    assert "'sdsup.convert' 'import' '--pretrained=/models/sd-v1-5' '--out=/shared/aldm/sd15'" in lines[0]
    assert "'--fake_class' '--out=/shared/aldm/segmenters/discriminator_ade20k'" in lines[1]
    assert "'--out=/shared/aldm/segmenters/upernet101_ade20k'" in lines[2] and "--fake_class" not in lines[2]
    assert "'--config=configs/aldm.py:ade20k'" in lines[3] and "'--only=data'" in lines[3]
    assert "'--config.evalseg.pretrained=/shared/aldm/segmenters/upernet101_ade20k'" in lines[3]
    cityscapes = _bash([script, "cityscapes", "prepare"], env)
    assert "decoder_epoch_50_20cls.pth" in cityscapes.stdout and "--image_mean=0.5,0.5,0.5" in cityscapes.stdout
    tpu = _bash([script, "ade20k", "tpu", "--config.input.batch_size=16"], env)
    assert tpu.returncode == 0 and "--worker=all" in tpu.stdout and "configs/aldm.py:ade20k" in tpu.stdout
    assert "--config.input.batch_size=16" in tpu.stdout
    slurm = _bash([script, "folder", "slurm"], dict(env, NODES="4"))
    assert slurm.returncode == 0 and "'sbatch' '--nodes=4'" in slurm.stdout
    assert "CONFIG=configs/aldm.py:folder" in slurm.stdout and "discriminator_init" not in slurm.stdout
    bad = _bash([script, "coco", "tpu"], env)
    assert bad.returncode == 2 and "ade20k|cityscapes|folder" in bad.stderr
    missing = _bash([script, "ade20k", "prepare"], {"DRY_RUN": "1", "ROOT": "/r", "DATA": "/d", "SD_PIPELINE": "",
                                                      "CSAIL_DIR": ""})
    assert missing.returncode != 0 and "SD_PIPELINE" in missing.stderr
