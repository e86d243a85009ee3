"""CLIP score: preprocessing vs transformers' CLIPImageProcessor, a saved tiny CLIPModel loaded
through sdsup and scored against transformers, the no-directory path, and input errors."""

import copy
import json
import os

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from helpers import write_clip_tokenizer
from sdsup.convert.clip_vision import ClipConvertError, load_clip
from sdsup.errors import SdsupError
from sdsup.evaluation import clip_score
from sdsup.evaluation.clip_score import CLIP_STD, RESIZE_MAX_LEVELS, ClipScoreError, ClipScorer, preprocess

torch.set_num_threads(1)  # the CPU cores are shared with other test runs

_RNG = np.random.default_rng(0)


def _smooth(n, h, w):
    """Photo-like images: smooth structure plus mild noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 7.0 + c) * np.cos(yy / 5.0 - c) for c in range(3)], -1)
    return np.clip(127.5 + 127.5 * base + _RNG.normal(0, 20, (n, h, w, 3)), 0, 255).astype(np.uint8)


def _noise(n, h, w):
    """The worst case for bicubic overshoot."""
    return _RNG.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# (height, width, image_size): upsampling, downsampling, landscape, portrait,
# odd sizes with an odd crop margin, and an image already at the model's size.
SHAPES = [(64, 64, 224), (300, 400, 224), (481, 360, 224), (37, 53, 32), (200, 151, 32), (32, 32, 32)]


def _pil_processor(size):
    return transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _processor_pixels(processor, images):
    out = processor(images=list(images), return_tensors="np")["pixel_values"]
    return np.asarray(out).transpose(0, 2, 3, 1)  # NCHW -> NHWC


def _torchvision_backend(images, size):
    """transformers' default (torchvision) CLIPImageProcessor path on CPU, written with torch alone:
    torch's antialiased bicubic on the uint8 tensor, then (x - 255 mean) / (255 std) in float32."""
    _, h, w, _ = images.shape
    nh, nw = clip_score.resized_shape(h, w, size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    if (nh, nw) != (h, w):
        x = torch.nn.functional.interpolate(x, size=[nh, nw], mode="bicubic", align_corners=False, antialias=True)
    top, left = int((nh - size) / 2.0), int((nw - size) / 2.0)
    x = x[:, :, top:top + size, left:left + size].float()
    mean, std = torch.tensor(clip_score.CLIP_MEAN) * 255, torch.tensor(CLIP_STD) * 255
    return ((x - mean[:, None, None]) / std[:, None, None]).permute(0, 2, 3, 1).numpy()


def _torchvision_usable():
    try:
        from torchvision.transforms.v2 import functional  # noqa: F401

        return True
    except Exception:  # absent, or a build that does not fit this torch
        return False


# One level of uint8 after normalisation, for the channel with the smallest std.
LEVEL = 1.0 / (255 * min(CLIP_STD))


@pytest.mark.parametrize("h,w,size", SHAPES)
def test_preprocess_matches_clip_image_processor(h, w, size):
    images = np.concatenate([_smooth(2, h, w), _noise(1, h, w)])
    ours = preprocess(images, size)
    assert ours.shape == (3, size, size, 3) and ours.dtype == np.float32

    # Pillow backend: bitwise.
    np.testing.assert_array_equal(ours, _processor_pixels(_pil_processor(size), images))

    # torchvision backend (transformers' default when torchvision is installed):
    # a uint8 level or two on a few pixels, nothing else.
    tv = _torchvision_backend(images, size)
    assert np.abs(ours - tv).max() <= RESIZE_MAX_LEVELS * LEVEL + 1e-5
    assert np.mean(np.abs(ours - tv) > 1e-5) < 0.02
    if _torchvision_usable():
        real = _processor_pixels(transformers.CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}), images)
        np.testing.assert_allclose(real, tv, atol=1e-5)

    # On-device resize: Pillow's two uint8 passes in JAX.
    ours_u8 = clip_score.preprocess_uint8(images, size)
    jax_u8 = clip_score.preprocess_uint8(images, size, resize="jax")
    levels = np.abs(ours_u8.astype(int) - jax_u8.astype(int))
    assert levels.max() <= RESIZE_MAX_LEVELS and np.mean(levels > 0) < 0.02, (levels.max(), np.mean(levels > 0))


def test_preprocess_refuses_bad_images():
    with pytest.raises(ClipScoreError, match="uint8"):
        preprocess(np.zeros((1, 8, 8, 3), np.float32), 8)
    with pytest.raises(ClipScoreError, match=r"shape \(8, 8, 3\)"):
        preprocess(np.zeros((8, 8, 3), np.uint8), 8)
    with pytest.raises(ClipScoreError, match=r"shape \(1, 8, 8, 4\)"):
        preprocess(np.zeros((1, 8, 8, 4), np.uint8), 8)
    with pytest.raises(ClipScoreError, match="resize='lanczos'"):
        preprocess(np.zeros((1, 8, 8, 3), np.uint8), 8, resize="lanczos")


# ---------------------------------------------------------------------------
# A tiny random CLIPModel saved as transformers does, with a tiny tokenizer.

IMAGE_SIZE = 32
PROMPTS = ["a photo of a cat", "sky over grass", "a car left of a tree", "a photo of grass", "cat"]


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ("layer_norm" in name or "layrnorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "embedding" in name and "patch" not in name:
                p.copy_(0.5 * noise)
            elif name == "logit_scale":
                p.copy_(torch.tensor(2.3))
            elif name.endswith("weight"):
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * noise)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """(directory, transformers CLIPModel) for a tiny random CLIP with openai's layout and legacy EOS pooling."""
    directory = str(tmp_path_factory.mktemp("clip"))
    write_clip_tokenizer(directory)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    assert tokenizer.eos_token_id == len(tokenizer) - 1  # what argmax pooling (eos_token_id 2) relies on
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                         bos_token_id=0, pad_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                           image_size=IMAGE_SIZE, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    _randomize(model, seed=3)
    model.save_pretrained(directory)
    assert os.path.isfile(os.path.join(directory, "model.safetensors"))
    return directory, model


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ClipScorer.from_config_path(clip_dir[0], batch_size=2)


def _torch_clip_scores(model, directory, images, prompts):
    """100 * cos per pair the torchmetrics way: CLIPProcessor-style inputs, CLIPModel features."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    text = tokenizer(prompts, padding=True, return_tensors="pt")
    pixels = torch.from_numpy(_processor_pixels(_pil_processor(IMAGE_SIZE), images).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        image_f = model.get_image_features(pixel_values=pixels).pooler_output
        text_f = model.get_text_features(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
    image_n = image_f / image_f.norm(dim=-1, keepdim=True)
    text_n = text_f / text_f.norm(dim=-1, keepdim=True)
    return image_f.numpy(), text_f.numpy(), (100 * (image_n * text_n).sum(-1)).double().numpy()


def test_loader_reads_a_saved_clip_model(clip_dir):
    directory, model = clip_dir
    ckpt = load_clip(directory)
    assert ckpt.text_config.eos_token_id == 2 and ckpt.text_config.projection_dim == 16
    assert ckpt.vision_config.image_size == IMAGE_SIZE and ckpt.vision_config.patch_size == 8
    assert ckpt.vision_config.projection_dim == 16 and ckpt.vision_config.num_attention_heads == 3
    assert ckpt.logit_scale == pytest.approx(float(model.logit_scale.detach()))
    sd = model.state_dict()
    np.testing.assert_array_equal(ckpt.vision_params["visual_projection"]["kernel"],
                                  sd["visual_projection.weight"].numpy().T)
    np.testing.assert_array_equal(ckpt.text_params["text_projection"]["kernel"], sd["text_projection.weight"].numpy().T)
    np.testing.assert_array_equal(ckpt.vision_params["vision_model"]["embeddings"]["class_embedding"],
                                  sd["vision_model.embeddings.class_embedding"].numpy())


def test_clip_score_matches_transformers(clip_dir, scorer):
    directory, model = clip_dir
    # Five pairs in batches of two: the last batch is padded.
    images = np.concatenate([_smooth(3, 40, 56), _noise(2, 40, 56)])
    image_f, text_f, ref = _torch_clip_scores(model, directory, images, PROMPTS)

    ours_image = scorer.image_embeddings(images)
    ours_text = scorer.text_embeddings(PROMPTS)
    image_diff = np.abs(ours_image - image_f).max()
    text_diff = np.abs(ours_text - text_f).max()
    assert image_diff <= 1e-4 * max(1.0, np.abs(image_f).max()), image_diff
    assert text_diff <= 1e-4 * max(1.0, np.abs(text_f).max()), text_diff

    result = scorer.score(images, PROMPTS)
    assert result.count == 5
    np.testing.assert_allclose(result.per_pair, ref, atol=1e-3)
    want = float(np.mean(np.maximum(ref, 0)))
    assert result.score == pytest.approx(want, rel=1e-3, abs=1e-4)
    assert result.torchmetrics_score == pytest.approx(max(float(np.mean(ref)), 0.0), rel=1e-3, abs=1e-4)
    # Random weights give some negative cosines, so the two aggregates really differ here.
    assert (ref < 0).any() and (ref > 0).any()
    print("max abs diff: image_embeds", image_diff, "text_embeds", text_diff,
          "per-pair score", np.abs(result.per_pair - ref).max())

    # Batches scored separately combine to the same numbers.
    parts = clip_score.ClipScoreResult.concatenate([scorer.score(images[:2], PROMPTS[:2]),
                                                    scorer.score(images[2:], PROMPTS[2:])])
    np.testing.assert_allclose(parts.per_pair, result.per_pair, atol=1e-9)

    # The on-device resize moves the scores by a small fraction of a point
    # (a copy shares the compiled towers).
    jax_scorer = copy.copy(scorer)
    jax_scorer.resize = "jax"
    jax_diff = np.abs(jax_scorer.score(images, PROMPTS).per_pair - ref).max()
    print("resize='jax': max abs per-pair score diff", jax_diff)
    assert jax_diff < 0.05  # measured 7e-4 points


def test_no_directory_skips_with_a_notice(monkeypatch):
    seen = []
    monkeypatch.setattr(clip_score.logging, "warning", lambda msg, *args: seen.append(msg % args if args else msg))
    assert ClipScorer.from_config_path(None) is None
    assert ClipScorer.from_config_path("") is None
    assert seen == [clip_score.SKIP_NOTICE] * 2 and "CLIP score skipped" in seen[0]


def test_bad_inputs_raise_clear_errors(clip_dir, scorer):
    images = _smooth(2, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ClipScoreError, match="2 images but 3 prompts"):
        scorer.score(images, PROMPTS[:3])
    with pytest.raises(ClipScoreError, match="one string"):
        scorer.score(images[:1], "a photo of a cat")
    with pytest.raises(ClipScoreError, match="uint8"):
        scorer.score(images.astype(np.float32) / 255, PROMPTS[:2])
    with pytest.raises(ClipScoreError, match="entry 1 is int"):
        scorer.score(images, ["a cat", 3])
    with pytest.raises(ClipScoreError, match="batch_size"):
        ClipScorer(load_clip(clip_dir[0]), scorer.tokenizer, batch_size=0)
    assert issubclass(ClipScoreError, SdsupError)


def _copy_with(src, dst, *, state=None, config=None, drop=(), replace=None):
    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(config or {})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    if state is not False:
        sd = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
        sd = {k: v for k, v in sd.items() if k not in drop}
        sd.update(replace or {})
        safetensors.numpy.save_file(sd, os.path.join(dst, "model.safetensors"))
    return dst


def test_loader_errors_name_the_file_and_key(clip_dir, tmp_path):
    directory, _ = clip_dir
    with pytest.raises(ClipConvertError, match="not found"):
        ClipScorer.from_config_path(str(tmp_path / "nope"))

    pickled = _copy_with(directory, str(tmp_path / "pickled"), state=False)
    with open(os.path.join(pickled, "pytorch_model.bin"), "wb") as f:
        f.write(b"never unpickled")
    with pytest.raises(SdsupError, match="only pickle weights"):
        load_clip(pickled)

    with pytest.raises(ClipConvertError, match="model_type 'siglip'"):
        load_clip(_copy_with(directory, str(tmp_path / "siglip"), config={"model_type": "siglip"}))

    no_config = str(tmp_path / "no_config")
    os.makedirs(no_config)
    with pytest.raises(ClipConvertError, match="no config.json"):
        load_clip(no_config)

    missing = _copy_with(directory, str(tmp_path / "missing"), drop=["vision_model.post_layernorm.bias"])
    with pytest.raises(ClipConvertError, match=r"vision tower: .*missing keys \['vision_model.post_layernorm.bias'\]"):
        load_clip(missing)

    bad = _copy_with(directory, str(tmp_path / "bad"),
                     replace={"text_projection.weight": np.zeros((16, 31), np.float32)})
    with pytest.raises(ClipConvertError,
                       match=r"model.safetensors\): text tower: text_projection.weight: shape \(16, 31\)"):
        load_clip(bad)

    no_scale = _copy_with(directory, str(tmp_path / "no_scale"), drop=["logit_scale"])
    with pytest.raises(ClipConvertError, match=r"missing keys \['logit_scale'\]"):
        load_clip(no_scale)

    # A config whose vision tower is deeper than the weights.
    deeper = _copy_with(directory, str(tmp_path / "deeper"),
                        config={"vision_config": dict(json.load(open(os.path.join(directory, "config.json")))
                                                      ["vision_config"], num_hidden_layers=3)})
    with pytest.raises(ClipConvertError, match="vision_model.encoder.layers.2.self_attn.q_proj.weight"):
        load_clip(deeper)
