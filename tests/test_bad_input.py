"""Bad input, as a table: every CLI, every kind of mistake, one clear line and nothing changed.

Each row of `ROWS` is one mistake a user can make with one entry point
(`sdsup.train`, `sdsup.sample`, `sdsup.evaluate`, `sdsup.convert` and its
subcommands, `sdsup.convert.inception`, `sdsup.caption`,
`sdsup.experiments.ablation`): a bad flag value, a missing or unreadable
path, a file of the wrong kind, an empty prompt, a layout of the wrong size
or with unknown ids or colours, a config value of the wrong type, a workdir
from another config. For every row the test asserts

  * a non-zero exit status,
  * the last line on stderr starts with "error: " and names the bad thing,
  * no Python traceback reaches the user,
  * nothing already written changed (every file the row can touch is hashed before and after).

Speed: a CLI started as a subprocess costs 3-5 s of imports on 2 cores, so
most rows call the entry point in this process, with argv, as
`python -m ...` would (absl's `app.run` with the module's flags, or the
argparse `main(argv)`; tests/cli_harness.py), capturing stderr and the exit
status. Every such error is caught before anything is compiled or trained:
the real work is replaced by a failure for these calls, so a row that gets
past its checks fails at once. Rows marked `subprocess` also run as real
processes, started together, to prove that what a real user sees has no
traceback either. Rows that need a finished workdir read the shared smoke
run (`smoke_run` in conftest.py) or damage a private copy of it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np
import pytest
from PIL import Image

import smoke_workdir
from cli_harness import (ENTRY_POINTS, Outcome, assert_clear_error, block_real_work, call_in_process,
                         call_subprocess, tree_hashes)
from sdsup import viz
from sdsup.data import registry

ROOT = smoke_workdir.ROOT
SMOKE = "configs/scenes.py:smoke"


@dataclasses.dataclass
class Context:
    """Where a row's paths point: its own scratch folder, and (when it needs one) a finished workdir."""

    tmp: str
    wd: str = ""  # a finished smoke workdir: the shared, read-only one, or a private copy
    tfds: str = ""  # the smoke run's tfds data_dir

    def fill(self, arg: str) -> str:
        return arg.format(tmp=self.tmp, wd=self.wd, tfds=self.tfds, root=ROOT)


@dataclasses.dataclass
class Row:
    id: str
    cli: str  # a key of ENTRY_POINTS
    args: Sequence[str]  # {tmp}, {wd}, {tfds}, {root} are filled in
    message: str  # what the last stderr line must name (after "error: ")
    setup: Optional[Callable[[Context], None]] = None  # writes the row's bad files into ctx.tmp (or ctx.wd)
    workdir: str = ""  # "": none; "shared": the shared finished run, read-only; "copy": a private copy to damage
    subprocess: bool = False  # also run it as a real `python -m` process


# ------------------------------------------------------------------------------------------------ bad files


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _files(**named: bytes) -> Callable[[Context], None]:
    """A setup that writes ctx.tmp/<name> for each keyword (a "__" in the name is a "/")."""
    def setup(ctx: Context) -> None:
        for name, data in named.items():
            _write(os.path.join(ctx.tmp, name.replace("__", "/")), data)
    return setup


def _npy(name: str, array: np.ndarray, allow_pickle: bool = False) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        np.save(os.path.join(ctx.tmp, name), array, allow_pickle=allow_pickle)
    return setup


def _png(name: str, array: np.ndarray) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        Image.fromarray(array).save(os.path.join(ctx.tmp, name))
    return setup


def _palette_layout_with_a_foreign_colour(ctx: Context) -> None:
    rgb = viz.colorize(np.zeros((32, 32), np.uint8), registry.SCENES.palette)
    rgb[5, 7] = (1, 2, 3)  # in no palette
    Image.fromarray(rgb).save(os.path.join(ctx.tmp, "colours.png"))


def _unfinished(stage: str) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        os.remove(os.path.join(ctx.wd, stage, "DONE.json"))
    return setup


def _garbage_config(ctx: Context) -> None:
    _write(os.path.join(ctx.tmp, "wd", "config.json"), b"{not json")


def _non_empty_out(ctx: Context) -> None:
    _write(os.path.join(ctx.tmp, "out", "keep.txt"), b"mine")


def _images_folder(ctx: Context) -> None:
    os.makedirs(os.path.join(ctx.tmp, "images"), exist_ok=True)
    Image.new("RGB", (8, 8)).save(os.path.join(ctx.tmp, "images", "a.png"))


def _directory(name: str) -> Callable[[Context], None]:
    def setup(ctx: Context) -> None:
        os.makedirs(os.path.join(ctx.tmp, name))
    return setup


def _blip_without_weights(ctx: Context) -> None:
    """Enough of a BLIP captioning directory to pass the checks made before the model is loaded."""
    _write(os.path.join(ctx.tmp, "blip", "config.json"),
           json.dumps({"model_type": "blip", "architectures": ["BlipForConditionalGeneration"]}).encode())


GARBAGE = b"\x00\x01 this is not what the file name says \xff" * 8
NPY_HEADER_ONLY = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (9,), }"


# ------------------------------------------------------------------------------------------------ the table

ROWS = [
    # --- python -m sdsup.train: flags and config values, before anything is built -------------------
    Row("train/unknown_flag", "train", ["--config=" + SMOKE, "--workdir={tmp}/wd", "--wrokdir=x"],
        "wrokdir"),
    Row("train/missing_workdir_flag", "train", ["--config=" + SMOKE], "--workdir"),
    Row("train/positional_argument", "train", ["--config=" + SMOKE, "--workdir={tmp}/wd", "stray"],
        "unexpected arguments ['stray']"),
    Row("train/config_value_wrong_type", "train",
        ["--config=" + SMOKE, "--workdir={tmp}/wd", "--config.input.batch_size=abc"],
        "--config.input.batch_size=abc"),
    Row("train/config_bool_wrong_type", "train",
        ["--config=" + SMOKE, "--workdir={tmp}/wd", "--config.evaluate.full_frame=maybe"],
        "config.evaluate.full_frame"),
    Row("train/unknown_config_key", "train", ["--config=" + SMOKE, "--workdir={tmp}/wd", "--config.input.bach_size=3"],
        "config.input has no 'bach_size'"),
    Row("train/renamed_config_key", "train",
        ["--config=" + SMOKE, "--workdir={tmp}/wd", "--config.control.discriminator.depths=(2,2,2)"],
        "use config.discriminator.model.depths"),
    Row("train/bad_config_value", "train", ["--config=" + SMOKE, "--workdir={tmp}/wd", "--config.data.image_size=30"],
        "config.data.image_size must be a multiple of 8"),
    Row("train/negative_batch_size", "train", ["--config=" + SMOKE, "--workdir={tmp}/wd", "--config.input.batch_size=-8"],
        "config.input.batch_size must be a positive integer"),
    Row("train/unknown_stage_in_config", "train",
        ["--config=" + SMOKE, "--workdir={tmp}/wd", "--config.stages=('data','vea')"],
        "config.stages has unknown stage 'vea'"),
    Row("train/mesh_bigger_than_the_devices", "train",
        ["--config=" + SMOKE, "--workdir={tmp}/wd", "--config.mesh.data=64"], "needs 64 devices"),
    Row("train/missing_config_file", "train", ["--config={tmp}/nope.py", "--workdir={tmp}/wd"], "nope.py"),
    Row("train/config_file_not_python", "train", ["--config={tmp}/notes.txt", "--workdir={tmp}/wd"], "notes.txt",
        setup=_files(**{"notes.txt": b"just words\n"})),
    Row("train/config_argument_unknown", "train", ["--config=configs/scenes.py:tiniest", "--workdir={tmp}/wd"],
        "tiniest"),
    Row("train/config_without_get_config", "train", ["--config={tmp}/empty.py", "--workdir={tmp}/wd"],
        "get_config", setup=_files(**{"empty.py": b"X = 1\n"})),
    Row("train/unknown_stage_in_only", "train", ["--config=" + SMOKE, "--workdir={tmp}/wd", "--only=data,vea"],
        "--only names 'vea'"),
    Row("train/workdir_is_a_file", "train", ["--config=" + SMOKE, "--workdir={tmp}/file"], "file",
        setup=_files(file=b"not a directory")),
    Row("train/workdir_from_another_config", "train",
        ["--config=configs/scenes.py", "--workdir={wd}", "--config.data.data_dir={tfds}"],
        "was trained with another config", workdir="copy"),
    Row("train/bad_process_count", "train", ["--config=" + SMOKE, "--workdir={tmp}/wd", "--num_processes=two"],
        "--num_processes"),

    # --- python -m sdsup.sample -----------------------------------------------------------------------
    Row("sample/empty_prompt", "sample", ["--workdir={wd}", "--prompt=   ", "--out={tmp}/out"], "the prompt is empty",
        workdir="shared"),
    Row("sample/missing_prompt_flag", "sample", ["--workdir={wd}", "--out={tmp}/out"], "--prompt"),
    Row("sample/missing_workdir", "sample", ["--workdir={tmp}/nowhere", "--prompt=sky.", "--out={tmp}/out"],
        "nowhere"),
    Row("sample/not_a_workdir", "sample", ["--workdir={tmp}", "--prompt=sky.", "--out={tmp}/out"],
        "has no config.json"),
    Row("sample/garbage_config_json", "sample", ["--workdir={tmp}/wd", "--prompt=sky.", "--out={tmp}/out"],
        "config.json", setup=_garbage_config),
    Row("sample/stage_not_finished", "sample", ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out"],
        "stage ldm", setup=_unfinished("ldm"), workdir="copy"),
    Row("sample/num_samples_zero", "sample", ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--num_samples=0"],
        "--num_samples must be at least 1"),
    Row("sample/steps_zero", "sample", ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--steps=0"],
        "--steps must be at least 1"),
    Row("sample/seed_not_a_number", "sample", ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--seed=abc"],
        "--seed"),
    Row("sample/unknown_solver", "sample", ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--solver=euler"],
        "--solver"),
    Row("sample/negative_guidance", "sample", ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--guidance=-2"],
        "--guidance must be"),
    Row("sample/negative_layout_temperature", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout_temperature=-1"],
        "--layout_temperature must be", workdir="shared"),
    Row("sample/layout_steps_zero", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout_only", "--layout_steps=0"],
        "--layout_steps must be at least 1", workdir="shared"),
    Row("sample/out_is_a_file", "sample", ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/taken"],
        "taken", setup=_files(taken=b"mine"), workdir="shared"),
    Row("sample/layout_missing", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout={tmp}/nope.npy"],
        "layout file not found", workdir="shared"),
    Row("sample/layout_wrong_kind", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout={tmp}/map.jpg"],
        "expected a .npy (class ids) or .png", setup=_files(**{"map.jpg": GARBAGE}), workdir="shared"),
    Row("sample/layout_corrupt_png", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout={tmp}/bad.png"],
        "cannot read layout", setup=_files(**{"bad.png": b"\x89PNG not really"}), workdir="shared"),
    Row("sample/layout_truncated_npy", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout={tmp}/cut.npy"],
        "cannot read layout", setup=_files(**{"cut.npy": NPY_HEADER_ONLY}), workdir="shared"),
    Row("sample/layout_pickled_npy", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout={tmp}/obj.npy"],
        "cannot read layout", setup=_npy("obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
        workdir="shared"),
    Row("sample/layout_is_a_directory", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout={tmp}/ids.npy"],
        "cannot read layout", setup=_directory("ids.npy"), workdir="shared"),
    Row("sample/layout_wrong_size", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout={tmp}/small.npy"],
        "this model needs 32x32", setup=_npy("small.npy", np.zeros((16, 16), np.uint8)), workdir="shared",
        subprocess=True),
    Row("sample/layout_three_dims", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout={tmp}/cube.npy"],
        "expected [H, W] class ids", setup=_npy("cube.npy", np.zeros((2, 32, 32), np.uint8)), workdir="shared"),
    Row("sample/layout_unknown_ids", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout={tmp}/ids.npy"],
        "outside the 13 classes", setup=_npy("ids.npy", np.full((32, 32), 40, np.uint8)), workdir="shared"),
    Row("sample/layout_float_ids", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout={tmp}/f.npy"],
        "expected integer class ids", setup=_npy("f.npy", np.zeros((32, 32), np.float32)), workdir="shared"),
    Row("sample/layout_unknown_colour", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout={tmp}/colours.png"],
        "colour (1, 2, 3) at (5, 7) is not in the scenes palette", setup=_palette_layout_with_a_foreign_colour,
        workdir="shared"),
    Row("sample/layout_png_unknown_ids", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout={tmp}/grey.png"],
        "outside the 13 classes", setup=_png("grey.png", np.full((32, 32), 200, np.uint8)), workdir="shared"),
    Row("sample/layout_with_layout_only", "sample",
        ["--workdir={wd}", "--prompt=sky.", "--out={tmp}/out", "--layout={tmp}/ids.npy", "--layout_only"],
        "cannot be combined with --layout", setup=_npy("ids.npy", np.zeros((32, 32), np.uint8)), workdir="shared"),

    # --- python -m sdsup.evaluate ---------------------------------------------------------------------
    Row("evaluate/examples_one", "evaluate", ["--workdir={wd}", "--examples=1"], "--examples must be at least 2"),
    Row("evaluate/unknown_split", "evaluate", ["--workdir={wd}", "--split=train"], "--split"),
    Row("evaluate/unknown_variant", "evaluate", ["--workdir={wd}", "--variants=control,nonsense"],
        "unknown variants ['nonsense']", workdir="shared"),
    Row("evaluate/not_a_workdir", "evaluate", ["--workdir={tmp}"], "has no config.json"),
    Row("evaluate/evalseg_not_finished", "evaluate", ["--workdir={wd}"], "stage evalseg",
        setup=_unfinished("evalseg"), workdir="copy"),
    Row("evaluate/missing_clip_dir", "evaluate", ["--workdir={wd}", "--clip_dir={tmp}/no_clip"], "no_clip",
        workdir="shared"),
    Row("evaluate/inception_dir_not_a_model", "evaluate", ["--workdir={wd}", "--inception_dir={tmp}"],
        "--inception_dir", workdir="shared"),

    # --- python -m sdsup.convert {import,export,csail,drn,upernet} -------------------------------------
    Row("convert/no_subcommand", "convert", [], "required"),
    Row("convert/unknown_subcommand", "convert", ["impart"], "impart"),
    Row("convert/import_missing_out_flag", "convert", ["import", "--pretrained={tmp}"], "--out"),
    Row("convert/import_missing_dir", "convert", ["import", "--pretrained={tmp}/nope", "--out={tmp}/out"],
        "nope", subprocess=True),
    Row("convert/import_a_file", "convert", ["import", "--pretrained={tmp}/model.bin", "--out={tmp}/out"],
        "model.bin", setup=_files(**{"model.bin": GARBAGE})),
    Row("convert/import_unknown_component", "convert",
        ["import", "--pretrained={tmp}/sd", "--out={tmp}/out", "--components=unet,refiner"], "refiner",
        setup=_directory("sd")),
    Row("convert/import_unknown_dtype", "convert",
        ["import", "--pretrained={tmp}/sd", "--out={tmp}/out", "--dtype=float7"], "--dtype 'float7'",
        setup=_directory("sd")),
    Row("convert/import_out_inside_pretrained", "convert", ["import", "--pretrained={tmp}", "--out={tmp}/out"],
        "must be outside --pretrained"),
    Row("convert/export_not_a_workdir", "convert", ["export", "--from={tmp}/src", "--out={tmp}/out"],
        "neither an imported directory", setup=_files(**{"src__notes.txt": b"x"})),
    Row("convert/export_into_non_empty_out", "convert", ["export", "--from={wd}", "--out={tmp}/out"], "not empty",
        setup=_non_empty_out, workdir="shared"),
    Row("convert/export_unknown_scheduler", "convert",
        ["export", "--from={tmp}", "--out={tmp}/out", "--scheduler=pndm"], "pndm"),
    Row("convert/csail_missing_encoder", "convert",
        ["csail", "--encoder={tmp}/enc.pth", "--decoder={tmp}/dec.pth", "--out={tmp}/out"], "enc.pth"),
    Row("convert/csail_garbage_weights", "convert",
        ["csail", "--encoder={tmp}/enc.pth", "--decoder={tmp}/dec.pth", "--out={tmp}/out"], "enc.pth",
        setup=_files(**{"enc.pth": GARBAGE, "dec.pth": GARBAGE})),
    Row("convert/csail_bad_image_mean", "convert",
        ["csail", "--encoder={tmp}/e", "--decoder={tmp}/d", "--out={tmp}/out", "--image_mean=0.5,0.5"],
        "--image_mean takes three comma-separated numbers"),
    Row("convert/drn_garbage_checkpoint", "convert", ["drn", "--checkpoint={tmp}/drn.pth", "--out={tmp}/out"],
        "drn.pth", setup=_files(**{"drn.pth": GARBAGE})),
    Row("convert/upernet_missing_dir", "convert", ["upernet", "--pretrained={tmp}/nope", "--out={tmp}/out"], "nope"),
    Row("inception/no_mode", "inception", [], "give either --torch_weights and --out"),
    Row("inception/missing_weights", "inception", ["--torch_weights={tmp}/pt.pth", "--out={tmp}/out"], "pt.pth"),
    Row("inception/garbage_weights", "inception", ["--torch_weights={tmp}/pt.pth", "--out={tmp}/out"], "pt.pth",
        setup=_files(**{"pt.pth": GARBAGE})),
    Row("inception/export_not_a_model", "inception", ["--from_model={tmp}", "--torch_out={tmp}/w.safetensors"],
        "config.json"),

    # --- python -m sdsup.caption ----------------------------------------------------------------------
    Row("caption/missing_images", "caption", ["--images={tmp}/nope", "--model={tmp}", "--out={tmp}/c.json"],
        "nope does not exist"),
    Row("caption/no_images", "caption", ["--images={tmp}", "--model={tmp}", "--out={tmp}/c.json"],
        "no .jpg/.jpeg/.png images"),  # as a real process in tests/test_caption.py::test_cli
    Row("caption/model_not_a_model", "caption", ["--images={tmp}/images", "--model={tmp}/images", "--out={tmp}/c.json"],
        "is not a transformers model directory", setup=_images_folder),
    Row("caption/batch_size_zero", "caption",
        ["--images={tmp}/images", "--model={tmp}", "--out={tmp}/c.json", "--batch_size=0"],
        "--batch_size must be a positive integer", setup=_images_folder),
    Row("caption/batch_size_not_a_number", "caption",
        ["--images={tmp}/images", "--model={tmp}", "--out={tmp}/c.json", "--batch_size=lots"], "--batch_size"),
    Row("caption/unknown_device", "caption",
        ["--images={tmp}/images", "--model={tmp}", "--out={tmp}/c.json", "--device=tpu"], "--device"),
    Row("caption/out_not_json", "caption", ["--images={tmp}/images", "--model={tmp}/blip", "--out={tmp}/c.json"],
        "c.json", setup=lambda ctx: (_images_folder(ctx), _blip_without_weights(ctx),
                                     _write(os.path.join(ctx.tmp, "c.json"), b"{oops"))),

    # --- python -m sdsup.experiments.ablation ---------------------------------------------------------
    Row("ablation/seeds_zero", "ablation", ["--config=" + SMOKE, "--workdir={tmp}/abl", "--seeds=0"],
        "--seeds must be at least 1", subprocess=True),
    Row("ablation/missing_config_file", "ablation", ["--config={tmp}/nope.py", "--workdir={tmp}/abl"], "nope.py"),
    Row("ablation/unknown_config_key", "ablation", ["--config=" + SMOKE, "--workdir={tmp}/abl", "--config.nope=1"],
        "unknown config key 'nope'"),
    Row("ablation/from_workdir_not_a_workdir", "ablation",
        ["--config=" + SMOKE, "--workdir={tmp}/abl", "--from_workdir={tmp}"], "is not a training workdir"),
    Row("ablation/from_workdir_of_another_config", "ablation",
        ["--config=configs/scenes.py", "--workdir={tmp}/abl", "--from_workdir={wd}"],
        "was trained with another config", workdir="shared"),
    Row("ablation/unknown_split", "ablation", ["--config=" + SMOKE, "--workdir={tmp}/abl", "--split=train"], "--split"),
]


# ------------------------------------------------------------------------------------------------ running


def check(row: Row, outcome: Outcome) -> None:
    assert_clear_error(outcome, row.message, row.id)


def prepare(row: Row, tmp_path, request) -> Context:
    ctx = Context(tmp=str(tmp_path / "row"))
    os.makedirs(ctx.tmp)
    if row.workdir:
        workdir, tfds = request.getfixturevalue("smoke_run")
        ctx.tfds = str(tfds)
        ctx.wd = str(workdir)
        if row.workdir == "copy":
            ctx.wd = str(smoke_workdir.copy_workdir(workdir, tmp_path / "wd"))
    elif any("{wd}" in a for a in row.args):
        ctx.wd = str(tmp_path / "no_workdir_needed")  # the row fails before it reads the workdir
    if row.setup:
        row.setup(ctx)
    return ctx


def test_the_table_covers_every_entry_point_with_40_rows_or_more():
    assert len(ROWS) >= 40
    assert len({r.id for r in ROWS}) == len(ROWS)
    assert {r.cli for r in ROWS} == ENTRY_POINTS
    # Real processes: an absl entry point reading a finished workdir, an argparse one, the ablation (train's are
    # in tests/test_train_cli.py, caption's in tests/test_caption.py).
    assert {r.cli for r in ROWS if r.subprocess} >= {"sample", "convert", "ablation"}


@pytest.fixture
def no_real_work(monkeypatch):
    """Every row must stop before the work; if one does not, it fails at once instead of training for minutes."""
    block_real_work(monkeypatch)


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_bad_input(row, tmp_path, request, monkeypatch, no_real_work):
    monkeypatch.chdir(ROOT)  # configs/... as a user types it, from the repository
    monkeypatch.delenv("SDSUP_DEBUG", raising=False)
    ctx = prepare(row, tmp_path, request)
    argv = [ctx.fill(a) for a in row.args]
    before = tree_hashes(ctx.tmp, ctx.wd)
    cache = jax.config.jax_compilation_cache_dir  # the suite's compilation cache stays the suite's
    check(row, call_in_process(row.cli, argv))
    assert tree_hashes(ctx.tmp, ctx.wd) == before, f"{row.id}: files changed"
    assert jax.config.jax_compilation_cache_dir == cache


SUBPROCESS_ROWS = [r for r in ROWS if r.subprocess]


def test_real_processes_show_no_traceback(tmp_path, request):
    """The `subprocess` rows as real `python -m` processes, started together (their imports overlap)."""
    prepared = []
    for i, row in enumerate(SUBPROCESS_ROWS):
        ctx = prepare(row, tmp_path / str(i), request)
        prepared.append((row, ctx, [ctx.fill(a) for a in row.args], tree_hashes(ctx.tmp, ctx.wd)))
    with concurrent.futures.ThreadPoolExecutor(len(prepared)) as pool:
        outcomes = list(pool.map(lambda p: call_subprocess(p[0].cli, p[2]), prepared))
    for (row, ctx, _, before), outcome in zip(prepared, outcomes):
        check(row, outcome)
        assert tree_hashes(ctx.tmp, ctx.wd) == before, f"{row.id}: files changed"
