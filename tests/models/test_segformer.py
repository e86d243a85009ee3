"""SegformerSegmenter and sdsup.convert.segformer against transformers' SegformerForSemanticSegmentation.

A tiny random Segformer (two stages, the first with a spatial-reduction
ratio of 2, the second with two blocks) is built with transformers, saved
with save_pretrained (config.json + model.safetensors, the released weight
names) next to a preprocessor_config.json, converted from that directory
and compared with the model transformers loads from it (local files only).
Weights and BatchNorm statistics are random and non-trivial (transformers'
init leaves LayerNorms at 1 / 0 and BatchNorm statistics at 0 / 1).
"""

import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from transformers import SegformerConfig as TransformersSegformerConfig
from transformers import SegformerForSemanticSegmentation

from sdsup.convert import segformer as conv
from sdsup.errors import SdsupError
from sdsup.models import io as model_io
from sdsup.models.segformer import SegformerConfig, SegformerSegmenter, abstract_variables
from sdsup.models.segmenter import IMAGENET_MEAN, IMAGENET_STD
from sdsup.workdir import load_model_dir

# float32 end to end, logits of magnitude ~5: differences are float32 rounding (rtol 0).
ATOL = 1e-4
LABELS = ["road", "car", "tree", "sky", "person"]
TINY = dict(num_encoder_blocks=2, hidden_sizes=[8, 16], depths=[1, 2], num_attention_heads=[1, 2], sr_ratios=[2, 1],
            patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[4, 2], decoder_hidden_size=12,
            id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
            # Training-only randomness off, so that train mode is deterministic in PyTorch too.
            drop_path_rate=0.0, classifier_dropout_prob=0.0)
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)
PREPROCESSOR = {"image_processor_type": "SegformerImageProcessor", "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD), "do_reduce_labels": False}
# Not multiples of the total stride 8: stage maps 13x19 and 7x10, resized back to 13x19 in the head.
HEIGHT, WIDTH = 52, 76


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.2)
            elif isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0.0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(1234)
    return model


def _images(seed, batch=2):
    x = np.random.RandomState(seed).uniform(-1.0, 1.0, (batch, HEIGHT, WIDTH, 3)).astype(np.float32)
    pv = ((x + 1.0) / 2.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return x, torch.from_numpy(np.ascontiguousarray(pv.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _outputs(config, variables, images):
    """(1/4-resolution logits, input-size logits, every stage's pooled features) in one compiled function."""
    model = SegformerSegmenter(config)

    def run(v, x):
        return (model.apply(v, x, method=SegformerSegmenter.decode_logits), model.apply(v, x),
                model.apply(v, x, all_stages=True, method=SegformerSegmenter.pooled_features))

    return jax.jit(run)(variables, images)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("segformer"))
    _randomize(SegformerForSemanticSegmentation(TransformersSegformerConfig(**TINY)), seed=0).save_pretrained(
        directory)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f)
    reference = SegformerForSemanticSegmentation.from_pretrained(directory, local_files_only=True).eval()
    config, variables = conv.load_transformers_segformer(directory)
    return dict(directory=directory, reference=reference, config=config, variables=variables)


# ----------------------------------------------------------------- numerics


def test_logits_match_transformers(case):
    config, variables, reference = case["config"], case["variables"], case["reference"]
    assert config == SegformerConfig(num_classes=5, hidden_sizes=(8, 16), depths=(1, 2), num_attention_heads=(1, 2),
                                     sr_ratios=(2, 1), patch_sizes=(7, 3), strides=(4, 2), mlp_ratios=(4, 2),
                                     decoder_hidden_size=12, image_mean=MEAN, image_std=STD)
    images, pv = _images(seed=1)
    low, full, pooled = _outputs(config, variables, images)
    with torch.no_grad():
        out = reference(pv, output_hidden_states=True)
    want_low = _nhwc(out.logits)
    want_full = _nhwc(F.interpolate(out.logits, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False))
    want_pooled = torch.cat([h.mean(dim=(2, 3)) for h in out.hidden_states], -1).numpy()
    assert low.shape == (2, 13, 19, 5) == want_low.shape and full.shape == (2, HEIGHT, WIDTH, 5)
    assert low.dtype == full.dtype == jnp.float32
    assert np.abs(want_low).max() > 1.0 and np.abs(want_low[0] - want_low[1]).max() > 0.1  # not vacuous
    np.testing.assert_allclose(np.asarray(low), want_low, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(full), want_full, rtol=0, atol=ATOL)
    assert pooled.shape == (2, 8 + 16)
    np.testing.assert_allclose(np.asarray(pooled), want_pooled, rtol=0, atol=ATOL)


def test_too_small_input_is_refused(case):
    # Stage 0's 1x1 map is smaller than its reduction ratio 2 (PyTorch fails in its conv).
    with pytest.raises(ValueError, match="too small"):
        jax.eval_shape(lambda x: SegformerSegmenter(case["config"]).apply(case["variables"], x),
                       jax.ShapeDtypeStruct((1, 4, 4, 3), jnp.float32))


# ----------------------------------------------------------------- conversion


def test_round_trip_exact(case):
    config, variables, reference = case["config"], case["variables"], case["reference"]
    saved = load_file(os.path.join(case["directory"], "model.safetensors"))
    released = conv.segformer_to_torch(config, variables)
    assert released.keys() == saved.keys()
    for key, value in saved.items():
        assert released[key].dtype == value.dtype, key
        np.testing.assert_array_equal(released[key], value, err_msg=key)
    current = conv.segformer_to_torch(config, variables, released_names=False)
    assert current.keys() == reference.state_dict().keys()
    fresh = SegformerForSemanticSegmentation(TransformersSegformerConfig(**TINY))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in current.items()}, strict=True)
    # The converted tree holds exactly the variables SegformerSegmenter.init makes, with their shapes.
    abstract = {k: v.shape for k, v in conv.flatten(nn.meta.unbox(dict(abstract_variables(config)))).items()}
    assert abstract == {k: np.shape(v) for k, v in conv.flatten(variables).items()}
    assert int(variables["batch_stats"]["decode_head"]["batch_norm"]["num_batches_tracked"]) == 1234


def test_pickle_weights_in_current_names(case, tmp_path):
    """pytorch_model.bin (torch.load(weights_only=True)) holding `model.state_dict()`: transformers >= 5 names."""
    directory = tmp_path / "bin"
    directory.mkdir()
    shutil.copy(os.path.join(case["directory"], "config.json"), directory)
    sd = {k: v for k, v in case["reference"].state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, directory / "pytorch_model.bin")
    config, variables = conv.load_transformers_segformer(str(directory))
    # No preprocessor_config.json: ImageNet's normalisation.
    assert config == dataclasses.replace(case["config"], image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    want = conv.flatten(case["variables"])
    got = conv.flatten(variables)
    assert got.keys() == want.keys()
    for key in want:
        expected = 0 if key[-1] == "num_batches_tracked" else want[key]
        np.testing.assert_array_equal(got[key], expected, err_msg="/".join(key))

    torch.save(torch.nn.Linear(2, 2), directory / "pytorch_model.bin")  # a pickled module: needs a full unpickle
    with pytest.raises(conv.SegformerConversionError, match=r"could not be read with torch\.load\(weights_only=True\)"):
        conv.load_transformers_segformer(str(directory))


def _write_config(directory, **changes):
    directory.mkdir()
    with open(directory / "config.json", "w") as f:
        json.dump({**TransformersSegformerConfig(**TINY).to_dict(), **changes}, f)
    return str(directory)


def test_bad_directories_give_clear_errors(case, tmp_path):
    err = conv.SegformerConversionError
    assert issubclass(err, SdsupError)
    with pytest.raises(err, match="does not exist or is not a directory"):
        conv.load_transformers_segformer(str(tmp_path / "nope"))
    with pytest.raises(err, match="Segformer config: .*config.json not found"):
        conv.load_transformers_segformer(str(tmp_path))
    with pytest.raises(err, match="expected a Segformer config \\(model_type 'segformer'\\), got model_type='upernet'"):
        conv.load_transformers_segformer(_write_config(tmp_path / "upernet", model_type="upernet"))
    with pytest.raises(err, match="describes a SegformerForImageClassification, not a "
                                  "SegformerForSemanticSegmentation"):
        conv.load_transformers_segformer(_write_config(tmp_path / "cls", architectures=[
            "SegformerForImageClassification"]))
    with pytest.raises(err, match="has no weights: neither model.safetensors nor pytorch_model.bin"):
        conv.load_transformers_segformer(_write_config(tmp_path / "empty"))
    with pytest.raises(err, match="depths has 3 entries but num_encoder_blocks=2"):
        conv.load_transformers_segformer(_write_config(tmp_path / "depths", depths=[1, 1, 1]))
    with pytest.raises(err, match="only hidden_act='gelu'"):
        conv.load_transformers_segformer(_write_config(tmp_path / "relu", hidden_act="relu"))


def test_bad_state_dicts_give_clear_errors(case):
    config = case["config"]
    sd = load_file(os.path.join(case["directory"], "model.safetensors"))
    err = conv.SegformerConversionError
    key = "segformer.encoder.block.0.0.attention.self.sr.weight"
    with pytest.raises(err, match=rf"missing key '{key}'"):  # named as the file names its keys
        conv.segformer_from_torch({k: v for k, v in sd.items() if k != key}, config)
    with pytest.raises(err, match=r"unexpected key 'segformer\.encoder\.block\.1\.0\.attention\.self\.sr\.weight'"):
        conv.segformer_from_torch({**sd, "segformer.encoder.block.1.0.attention.self.sr.weight": sd[key]}, config)
    with pytest.raises(err, match=r"'decode_head\.linear_fuse\.weight' has shape \(12, 16, 1, 1\), expected "
                                  r"\(12, 24, 1, 1\)"):
        conv.segformer_from_torch({**sd, "decode_head.linear_fuse.weight": np.zeros((12, 16, 1, 1), np.float32)},
                                  config)
    with pytest.raises(err, match="no decode_head"):
        conv.segformer_from_torch({k: v for k, v in sd.items() if k.startswith("segformer.")}, config)
    with pytest.raises(err, match="twice"):
        conv.segformer_from_torch({**sd, "decode_head.linear_projections.0.proj.bias": sd[
            "decode_head.linear_c.0.proj.bias"]}, config)


# ----------------------------------------------------------------- in sdsup


def test_convert_writes_a_model_directory(case, tmp_path, monkeypatch):
    """convert() -> an sdsup model directory that sdsup's loaders read once the kind is registered (done here
    with monkeypatch, as sdsup.models.io does not list "segformer_segmenter" yet)."""
    out = str(tmp_path / "segformer")
    messages = []
    config = conv.convert(case["directory"], out, log=messages.append)
    assert config == case["config"] and "5 classes" in messages[0]
    monkeypatch.setitem(model_io.CONFIG_CLASSES, conv.KIND, SegformerConfig)
    kind, loaded_config, variables, extra = model_io.load(out)
    assert (kind, loaded_config, extra["labels"]) == (conv.KIND, config, LABELS)
    assert model_io.kind_of(loaded_config) == conv.KIND
    want, got = conv.flatten(case["variables"]), conv.flatten(variables)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg="/".join(key))
        assert np.shape(got[key]) == np.shape(want[key])  # 0-d num_batches_tracked stays 0-d
    assert load_model_dir(out, (conv.KIND,))[0] == config
    with pytest.raises(conv.SegformerConversionError, match="already holds a model"):
        conv.convert(case["directory"], out, log=messages.append)


# ----------------------------------------------------------------- real size


def test_mit_b0_matches_transformers_defaults():
    """transformers' default SegformerConfig is MiT-b0; with ADE20K's 150 labels, the sizes of
    nvidia/segformer-b0-finetuned-ade-512-512 (built on the meta device, never run)."""
    tconfig = TransformersSegformerConfig(num_labels=150)
    config = conv.segformer_config_from_transformers(tconfig.to_dict())
    assert config == SegformerConfig() == SegformerConfig.mit("b0")
    with torch.device("meta"):
        real = SegformerForSemanticSegmentation(tconfig)
    want = {k: tuple(v.shape) for k, v in real.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert conv.expected_torch_keys(config) == want
    flax_params = sum(int(np.prod(s)) for k, s in want.items() if "running_" not in k)
    assert flax_params == sum(p.numel() for p in real.parameters()) == 3_752_694
    b5 = SegformerConfig.mit("b5", num_classes=19)
    assert (b5.hidden_sizes, b5.depths, b5.decoder_hidden_size) == ((64, 128, 320, 512), (3, 6, 40, 3), 768)
