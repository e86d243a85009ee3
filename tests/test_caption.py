"""python -m sdsup.caption: BLIP captions of a folder, {stem: caption} JSON, resumable, atomic, one-line errors.

The captioner is a tiny random-weight BLIP built here (nothing is
downloaded): its captions are garbage, so only their structure is tested.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

from sdsup import caption
from sdsup.caption import CaptionError, caption_folder, main, meta_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEMS = ["img_00", "img_01", "img_02", "img_03", "img_04"]
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "the", "on", "with", "tree", "sky", "road", "car", "."]
FAST = dict(batch_size=2, num_beams=2, max_new_tokens=4, progress=False)


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    """A tiny random BlipForConditionalGeneration + BlipProcessor, saved like a hub checkpoint."""
    torch.manual_seed(0)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    tokenizer = BertTokenizer(vocab=vocab)
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64, bos_token_id=vocab["[CLS]"],
                         sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"], pad_token_id=vocab["[PAD]"]),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=8),
        projection_dim=16)
    path = str(tmp_path_factory.mktemp("blip"))
    BlipForConditionalGeneration(config).save_pretrained(path)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(path)
    return path


def _images(folder, stems=STEMS):
    """Small random pictures, PNGs and JPEGs (one with an upper-case extension), of different sizes."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    extensions = [".png", ".jpg", ".JPEG", ".png", ".jpg"]
    for i, stem in enumerate(stems):
        pixels = rng.integers(0, 256, (20 + 3 * i, 28 + i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, stem + extensions[i % len(extensions)]))
    return str(folder)


def _count_generated(monkeypatch):
    """Wraps the generate step: the returned list gets the number of images of each call."""
    calls = []
    real = caption._generate

    def counting(model, processor, images, *args, **kwargs):
        calls.append(len(images))
        return real(model, processor, images, *args, **kwargs)

    monkeypatch.setattr(caption, "_generate", counting)
    return calls


def _leftovers(folder):
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_captions_every_image_by_stem_with_a_meta_sidecar(tmp_path, blip_dir):
    images = _images(tmp_path / "images")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    out = str(tmp_path / "captions.json")
    logged = []
    result = caption_folder(images, blip_dir, out, prompt="a photo of", log=logged.append, **FAST)

    assert sorted(result) == STEMS
    assert all(isinstance(v, str) for v in result.values())
    with open(out, encoding="utf-8") as f:
        assert json.load(f) == result  # exactly {stem: caption}, nothing else
    assert _leftovers(tmp_path) == []

    with open(meta_path(out), encoding="utf-8") as f:
        meta = json.load(f)
    assert meta["num_captions"] == 5 and meta["captions_file"] == "captions.json"
    assert (meta["batch_size"], meta["num_beams"], meta["max_new_tokens"], meta["prompt"]) == (2, 2, 4, "a photo of")
    assert meta["model"]["path"] == os.path.abspath(blip_dir)
    assert meta["model"]["architectures"] == ["BlipForConditionalGeneration"]
    assert set(meta["versions"]) >= {"transformers", "torch"} and meta["date"]
    assert len(meta["runs"]) == 1 and meta["runs"][0]["new_captions"] == 5
    assert any("wrote 5 new captions" in line for line in logged)


def test_resume_keeps_existing_captions_and_generates_only_the_rest(tmp_path, blip_dir, monkeypatch):
    images = _images(tmp_path / "images")
    out = tmp_path / "captions.json"
    before = {"img_01": "an earlier caption", "img_03": "another one", "elsewhere": "kept although no image"}
    out.write_text(json.dumps(before))
    calls = _count_generated(monkeypatch)

    result = caption_folder(images, blip_dir, str(out), **FAST)
    assert sum(calls) == 3
    assert set(result) == set(STEMS) | {"elsewhere"}
    assert {k: result[k] for k in before} == before
    assert json.loads(out.read_text()) == result

    # Everything captioned: the model is not even loaded.
    monkeypatch.setattr(caption, "_load_blip", lambda *a: pytest.fail("model loaded with nothing to do"))
    assert caption_folder(images, blip_dir, str(out), **FAST) == result


def test_a_run_stopped_mid_way_keeps_finished_batches_and_valid_json(tmp_path, blip_dir, monkeypatch):
    images = _images(tmp_path / "images")
    out = tmp_path / "captions.json"
    calls = _count_generated(monkeypatch)
    real = caption._generate

    def killed_on_second_batch(*args, **kwargs):
        if len(calls) == 1:
            calls.append(0)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(caption, "_generate", killed_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        caption_folder(images, blip_dir, str(out), **FAST)
    assert sorted(json.loads(out.read_text())) == STEMS[:2]  # the first batch survived, as valid JSON
    assert _leftovers(tmp_path) == []

    # A failure inside the write itself leaves the previous file whole and no temporary file behind.
    before = out.read_bytes()
    monkeypatch.setattr(caption.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        caption.write_json_atomically(str(out), {"x": "y"})
    assert out.read_bytes() == before and _leftovers(tmp_path) == []


def test_errors_name_the_folder_or_the_model(tmp_path, blip_dir):
    images = _images(tmp_path / "images")
    out = str(tmp_path / "captions.json")
    missing = str(tmp_path / "nowhere")
    with pytest.raises(CaptionError, match="nowhere does not exist"):
        caption_folder(missing, blip_dir, out, **FAST)
    with pytest.raises(CaptionError, match="no .jpg/.jpeg/.png images"):
        caption_folder(str(tmp_path), blip_dir, out, **FAST)

    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    with pytest.raises(CaptionError, match=r"not_a_model is not a transformers model directory"):
        caption_folder(images, str(not_a_model), out, **FAST)
    (not_a_model / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(CaptionError, match=r"not_a_model is not a BLIP model"):
        caption_folder(images, str(not_a_model), out, **FAST)
    with pytest.raises(CaptionError, match="nowhere does not exist"):
        caption_folder(images, missing, out, **FAST)
    with pytest.raises(CaptionError, match="--batch_size must be a positive integer"):
        caption_folder(images, blip_dir, out, **dict(FAST, batch_size=0))
    if not torch.cuda.is_available():
        with pytest.raises(CaptionError, match="--device cuda: .* no CUDA device"):
            caption_folder(images, blip_dir, out, device="cuda", **FAST)

    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "img_00.png.png")  # stem img_00.png: fine
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "img_02.png")  # img_02.JPEG exists
    with pytest.raises(CaptionError, match=r"img_02.*img_02\.JPEG and .*img_02\.png"):
        caption_folder(images, blip_dir, out, **FAST)
    assert not os.path.exists(out)


def test_an_image_that_does_not_decode_stops_or_is_skipped(tmp_path, blip_dir):
    images = _images(tmp_path / "images")
    (tmp_path / "images" / "img_02b.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # sorts into batch 2
    out = tmp_path / "captions.json"
    with pytest.raises(CaptionError, match=r"cannot decode image .*img_02b\.jpg"):
        caption_folder(images, blip_dir, str(out), **FAST)
    assert sorted(json.loads(out.read_text())) == STEMS[:2]  # the batch before it is kept

    logged = []
    result = caption_folder(images, blip_dir, str(out), skip_unreadable=True, log=logged.append, **FAST)
    assert sorted(result) == STEMS
    assert sum("skipped: cannot decode image" in line and "img_02b.jpg" in line for line in logged) == 1
    assert any("skipped 1 unreadable images" in line for line in logged)


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", json.dumps({"img_00": ["a list"]}), ""])
def test_an_out_file_that_is_not_an_object_of_strings_is_left_untouched(tmp_path, blip_dir, content):
    images = _images(tmp_path / "images")
    out = tmp_path / "captions.json"
    out.write_text(content)
    with pytest.raises(CaptionError, match="captions.json .*left untouched"):
        caption_folder(images, blip_dir, str(out), **FAST)
    assert out.read_text() == content and not os.path.exists(meta_path(str(out)))


def test_main_prints_one_error_line(tmp_path, capsys):
    assert main(["--images", str(tmp_path / "nowhere"), "--model", str(tmp_path), "--out",
                 str(tmp_path / "c.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nowhere" in err


def test_cli(tmp_path, blip_dir):
    images = _images(tmp_path / "images" / "sub")  # only found with --recursive
    out = tmp_path / "captions.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("SDSUP_DEBUG", None)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "sdsup.caption", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    done = cli(f"--images={tmp_path / 'images'}", f"--model={blip_dir}", f"--out={out}", "--recursive",
               "--batch_size=3", "--num_beams=1", "--max_new_tokens=3", "--prompt=a photo of")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(json.loads(out.read_text())) == STEMS
    assert os.path.exists(meta_path(str(out))) and images

    failed = cli(f"--images={tmp_path / 'images'}", f"--model={blip_dir}", f"--out={out}")  # not recursive
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no .jpg") and "Traceback" not in failed.stderr
