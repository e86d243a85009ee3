"""The autoencoder's loss: plain means, or class-balanced reconstruction terms (`vae.class_balance`)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdsup import segmentation
from sdsup.conditioning import images_to_float
from sdsup.models.vae import AutoencoderKL, VAEConfig
from sdsup.stages import vae as vae_stage


def _setup():
    config = VAEConfig(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                       sample_size=8)
    vae = AutoencoderKL(config)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    label = np.zeros((2, 8, 8), np.uint8)
    label[:, 2:4, 2:4] = 3  # a small thing on a large background
    params = vae.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]
    return vae, params, {"image": jnp.asarray(image), "label": jnp.asarray(label)}


def _cfg(class_balance):
    return ml_collections.ConfigDict(dict(l1_weight=1.0, l2_weight=0.0, kl_weight=0.0, class_balance=class_balance))


def test_class_balanced_reconstruction_weighs_small_things_as_much_as_the_background():
    vae, params, batch = _setup()
    rng = jax.random.PRNGKey(1)
    x = images_to_float(batch["image"])
    posterior = vae.apply({"params": params}, x, method=vae.encode)
    rec = vae.apply({"params": params}, posterior.sample(rng), method=vae.decode)
    per_pixel = jnp.mean(jnp.abs(rec - x), axis=-1)
    plain, _ = vae_stage.loss_fn(vae, _cfg(0.0), 5, 255)(params, batch, rng)
    balanced, metrics = vae_stage.loss_fn(vae, _cfg(1.0), 5, 255)(params, batch, rng)
    np.testing.assert_allclose(plain, jnp.mean(per_pixel), rtol=1e-5)
    thing, background = (float(jnp.mean(per_pixel[batch["label"] == c])) for c in (3, 0))
    # Power 1: each class present gets the same total weight, so the loss is the mean of the class means.
    np.testing.assert_allclose(balanced, (thing + background) / 2, rtol=1e-4)
    np.testing.assert_allclose(balanced, segmentation.balanced_mean(per_pixel, batch["label"], 5, 255, 1.0),
                               rtol=1e-5)
    assert np.isfinite(metrics["psnr"])
