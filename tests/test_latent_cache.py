"""The latent cache (control.latent_cache): records, the source that merges them, and the step that reads them.

The cached step must compute what the plain step computes from the same examples, up to the cache's
float16 latents and uint8 reconstructions; both flip orientations and the mirrored captions must be the
ones the step would have encoded.
"""

import os

import jax
import numpy as np
import pytest

import control_case
from sdsup import aldm, parallel, stages
from sdsup.data import latent_cache, pipeline
from sdsup.data.dataset import Dataset
from sdsup.stages import common
from sdsup.trainer import sharding


def _manifest(**kw):
    fields = dict(dataset="d", num_examples=3, image_size=8, latent_shape=(2, 2, 4), context_shape=(5, 6),
                  flipped_captions=False, models="abc", shards=2)
    fields.update(kw)
    return latent_cache.Manifest(**fields)


def _arrays(i):
    rng = np.random.default_rng(i)
    return (rng.normal(size=(2, 2, 2, 4)), rng.normal(size=(2, 2, 2, 4)),
            [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2)], rng.normal(size=(1, 2, 5, 6)))


def test_records_round_trip_and_the_source_checks_what_it_reads(tmp_path):
    directory = str(tmp_path / "cache")
    manifest = _manifest()
    for shard in range(2):
        writer = latent_cache.ShardWriter(directory, shard, 2)
        for i in range(*latent_cache.shard_range(3, shard, 2)):
            writer.write(latent_cache.encode_record(*_arrays(i)))
        assert latent_cache.read_manifest(directory) is None  # no manifest yet: not a cache
        writer.close()
    latent_cache.write_manifest(directory, manifest)
    source = [{"label": np.zeros((8, 8), np.uint8), "caption": f"c{i}"} for i in range(3)]
    cached = latent_cache.CachedSource(source, directory, manifest)
    for i in range(3):
        mean, logvar, recon, context = _arrays(i)
        record = cached[i]
        assert record["caption"] == f"c{i}"
        np.testing.assert_allclose(record["latent_mean"], mean, atol=2e-3, rtol=1e-3)  # float16
        np.testing.assert_allclose(record["latent_logvar"], logvar, atol=2e-3, rtol=1e-3)
        np.testing.assert_array_equal(record["reconstruction"], np.stack(recon))  # PNG: lossless
        assert record["context"].shape == (1, 2, 5, 6) and record["context"].dtype == np.float16
    with pytest.raises(latent_cache.CacheError, match="models: 'abc' != 'other'"):
        latent_cache.CachedSource(source, directory, _manifest(models="other"))
    with pytest.raises(latent_cache.CacheError, match="holds 3 examples, the split 2"):
        latent_cache.CachedSource(source[:2], directory, _manifest(num_examples=3))
    os.remove(latent_cache.shard_path(directory, 1, 2))
    with pytest.raises(latent_cache.CacheError, match="no complete latent cache"):
        latent_cache.CachedSource(source, directory, manifest)


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    """A tiny scenes dataset, random ALDM networks, the cache of its train split, both sources."""
    config = control_case.config()
    root = tmp_path_factory.mktemp("latent_cache")
    config.data.update(data_dir=str(root / "tfds"), num_train=control_case.BATCH, num_validation=4, num_test=4)
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    ctx = stages.Context(config=config, workdir=None, mesh=mesh)
    dataset = Dataset.open(config, ctx.tokenizer)
    setup, params = aldm.random_setup(config, ctx.tokenizer, mesh)
    manifest = setup.cache_manifest(dataset, params["vae"], params["text_encoder"], shards=1)
    directory = str(root / "cache")
    aldm.write_latent_cache(setup, dataset, directory, manifest, params["vae"], params["text_encoder"], shard=0,
                            batch_size=3)
    latent_cache.write_manifest(directory, manifest)
    source = latent_cache.CachedSource(dataset.source("train"), directory, manifest)
    return dict(config=config, ctx=ctx, mesh=mesh, dataset=dataset, setup=setup, params=params, source=source)


def test_both_orientations_and_the_mirrored_captions_are_what_the_step_would_encode(cached_run):
    setup, params, dataset, source = (cached_run[k] for k in ("setup", "params", "dataset", "source"))
    encode_images, encode_texts = setup.cache_encoders()
    record = source[5]
    image, _ = dataset.geometry.apply(record["image"], record["label"], None)
    mean, logvar, recon = (np.asarray(a) for a in encode_images(params["vae"], np.stack([image, image[:, ::-1]])))
    np.testing.assert_allclose(record["latent_mean"].astype(np.float32), mean, atol=5e-3, rtol=2e-3)
    np.testing.assert_allclose(record["latent_logvar"].astype(np.float32), logvar, atol=5e-3, rtol=2e-3)
    assert np.abs(record["reconstruction"].astype(int) - recon.astype(int)).max() <= 1
    caption = pipeline.text(record["caption"])
    tokens = dataset.tokenizer.encode_batch([caption, dataset.spec.flip_caption(caption)])
    want = np.asarray(encode_texts(params["text_encoder"], tokens))
    np.testing.assert_allclose(record["context"][:, 0].astype(np.float32), want, atol=5e-3, rtol=2e-3)

    # The pipeline picks the orientation the flip drew, for the label map and the latents alike.
    pre = pipeline.Preprocess(dataset.tokenizer, flip=True, flip_caption=dataset.spec.flip_caption,
                              geometry=dataset.geometry, keep_metadata=True)
    seen = set()
    for seed in range(12):
        out = pre.random_map(record, np.random.default_rng(seed))
        flipped = not np.array_equal(out["label"], np.asarray(record["label"]))
        seen.add(flipped)
        np.testing.assert_array_equal(out["latent_mean"], record["latent_mean"][int(flipped)])
        np.testing.assert_array_equal(out["reconstruction"], record["reconstruction"][int(flipped)])
        np.testing.assert_array_equal(out["context"], record["context"][int(flipped), 0])
        assert "image" not in out
    assert seen == {False, True}


def test_the_cached_step_computes_what_the_plain_step_computes(cached_run):
    """Same examples, state and rng, lazy (adversarial) step then plain step: the losses agree to the cache's
    float16 / uint8 rounding."""
    setup, params, ctx, mesh, dataset = (cached_run[k] for k in ("setup", "params", "ctx", "mesh", "dataset"))
    frozen = setup.frozen(mesh, params["unet"], params["vae"], params["text_encoder"])
    histories = {}
    for cached in (False, True):
        state, shardings = setup.create_state(mesh, params["unet"], jax.random.PRNGKey(0))
        step = common.compile_step(setup.step(shardings), state, ctx, control_case.BATCH, frozen,
                                   batch_shapes=setup.batch_shapes(control_case.BATCH, cached=cached))
        stream = iter(pipeline.train_dataset(cached_run["source"] if cached else dataset.source("train"),
                                             tokenizer=dataset.tokenizer, global_batch_size=control_case.BATCH,
                                             seed=3, flip_caption=dataset.spec.flip_caption,
                                             geometry=dataset.geometry, num_threads=0))
        history = []
        for i in range(2):  # n_lazy = 2: step 0 adversarial, step 1 plain
            batch = parallel.global_batch(next(stream), mesh)
            state, metrics = step(state, batch, jax.random.fold_in(jax.random.PRNGKey(7), i))
            history.append({k: float(v) for k, v in sharding.host_copy(metrics).items()})
        histories[cached] = history
    for plain, cached in zip(histories[False], histories[True]):
        for key in ("loss/noise", "loss/adv", "loss/seg_real", "loss/seg_fake", "grad_norm"):
            assert cached[key] == pytest.approx(plain[key], rel=2e-2, abs=1e-4), key
    assert histories[True][0]["adv/lazy_step"] == 1.0 and histories[True][0]["loss/adv"] > 0
