"""Segmentation conditioner: ControlNet (Zhang & Agrawala 2023) over a semantic label map, in Flax.

A ControlNet is a trainable copy of the UNet encoder (conv_in, time
embedding, down blocks, mid block; `UNetEncoderMixin`, same parameter names
as the UNet) plus

  * a hint encoder (`controlnet_cond_embedding`, diffusers'
    ControlNetConditioningEmbedding): conv3x3 cond->b0, SiLU, then per
    consecutive pair (b_i, b_i+1) a conv3x3 b_i->b_i and a stride-2 conv3x3
    b_i->b_i+1, each followed by SiLU, then a ZERO-initialised conv3x3
    b_last->block_out_channels[0]. Its output is added to conv_in's output;
  * zero-initialised 1x1 convs, one per encoder skip
    (`controlnet_down_blocks_*`, 12 for SD-1.5) and one on the mid block
    output (`controlnet_mid_block`).

`ControlNetModel.__call__` returns the residuals, multiplied by
`conditioning_scale`, in the form `UNet2DConditionModel` takes them
(`down_block_additional_residuals`, `mid_block_additional_residual`). The
UNet stays frozen; a freshly initialised ControlNet returns exact zeros and
so leaves the UNet output unchanged.

Parameter names follow diffusers' ControlNetModel (`controlnet_down_blocks_3/
kernel` is `controlnet_down_blocks.3.weight`), see `sdsup.convert.controlnet`.

Layout encodings (`ControlNetConfig.layout_encoding`)
----------------------------------------------------
"colour" -- the public `sd-controlnet-seg` format. The label map is painted
    with a palette: `colour_hint(labels, palette, ignore_id)` gives
    [B, H, W, 3] RGB in [0, 1] at IMAGE resolution; the hint encoder has 3
    stride-2 convs (default channels (16, 32, 96, 256)), 8x down to the latent
    size. An exported model takes a colour-coded map as `image=` in any
    diffusers ControlNet pipeline (channel order "rgb").

"class_embedding" -- ALDM (Li et al., ICLR 2024). Each pixel's class id
    becomes a D-dim vector from a per-class table (in practice the text
    encoder's embedding of "A photo of {class}"; the ignore id maps to the
    zero vector), at 1/4 of the image size: `class_embedding_hint(labels,
    table, ignore_id)` gives [B, H/4, W/4, D]. The hint encoder has diffusers'
    structure with conditioning_channels=D and ONE stride-2 conv (1/4 -> 1/8,
    the latent size); default channels `ALDM_HINT_CHANNELS` = (512, 256):

        conv3x3 D->512, SiLU, conv3x3 512->512, SiLU, conv3x3/2 512->256, SiLU,
        zero conv3x3 256->320

    Deviation from ALDM: ALDM's hint block is conv3x3 D->768, 768->512,
    512->256 stride 2, 256->256 (SiLU after each), zero conv 256->320. That
    is four convs before the zero conv with a stride-1 conv AFTER the
    stride-2 one and a channel change in a stride-1 conv, which diffusers'
    block structure (pairs "b_i->b_i, b_i->b_i+1 stride 2") cannot express.
    We use diffusers' structure so the exported model loads into an
    unmodified diffusers ControlNetModel; it has one conv fewer (no 256->256
    after the stride) and a 512-wide instead of a 768-wide first conv. ALDM
    checkpoints therefore do not convert to this layout one to one.

    Nearest downsampling rule (exactly what a PyTorch user reproduces): H and
    W must be divisible by 4 and the hint at (i, j) takes the label at
    (4 i, 4 j), i.e. `labels[:, ::4, ::4]`. This is identical to
    `F.interpolate(labels[:, None].float(), size=(H // 4, W // 4),
    mode="nearest")` (and to `scale_factor=0.25`), NOT to
    `mode="nearest-exact"`, which would take (4 i + 2, 4 j + 2).

In both encodings an id equal to `ignore_id`, or outside [0, N), maps to the
zero vector (black for "colour"). When the label map is concrete (not traced)
an id outside [0, N) that is not the ignore id raises ValueError instead.

Config and diffusers
--------------------
`ControlNetConfig` holds the encoder's `UNetConfig` (field `unet`) and the
ControlNet-only fields; it reads as that UNetConfig for the shared fields
(`config.block_out_channels`, `config.heads(i)`, ...), which is what
`UNetEncoderMixin` needs. diffusers' ControlNetModel has no decoder, no
`center_input_sample` (it never centres its input) and only an int
`layers_per_block`; the decoder-only fields of `unet` are normalised (see
`ControlNetConfig.__post_init__`) and a per-block `layers_per_block` is
refused. The stride counts above assume the 8x SD VAE; with another
`vae_scale_factor` the hint encoder needs log2(vae_scale_factor / image
pixels per hint pixel) stride-2 convs (`ControlNetConfig.from_unet` picks
matching defaults); the hints themselves stay at image and 1/4 resolution.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from sdsup.errors import SdsupError
from sdsup.models.layers import Conv
from sdsup.models.unet import STABLE_DIFFUSION_1_5, UNetConfig, UNetEncoderMixin, encoder_param_names

Array = jax.Array

LAYOUT_ENCODINGS = ("colour", "class_embedding")
# Image pixels per latent pixel of the Stable Diffusion VAE (the default of ControlNetConfig.vae_scale_factor).
VAE_SCALE_FACTOR = 8
# Image pixels per hint pixel for each encoding.
HINT_IMAGE_DOWNSAMPLE = {"colour": 1, "class_embedding": 4}
# Default hint encoder channels per encoding (diffusers' default / ALDM-like).
COLOUR_HINT_CHANNELS = (16, 32, 96, 256)
ALDM_HINT_CHANNELS = (512, 256)
DEFAULT_HINT_CHANNELS = {"colour": COLOUR_HINT_CHANNELS, "class_embedding": ALDM_HINT_CHANNELS}

# What a ControlNetConfig forwards to its UNetConfig.
_DELEGATED = frozenset(f.name for f in dataclasses.fields(UNetConfig)) | {
    "heads",
    "layers",
    "transformer_layers",
    "time_embed_dim",
    "num_skips",
}


def _hint_strides(layout_encoding: str, vae_scale_factor: int) -> int:
    """Stride-2 convs the hint encoder needs: log2(vae_scale_factor / image pixels per hint pixel)."""
    ratio = vae_scale_factor / HINT_IMAGE_DOWNSAMPLE[layout_encoding]
    n = int(round(np.log2(ratio))) if ratio >= 1 else -1
    if n < 0 or 2**n != ratio:
        raise ValueError(
            f"layout_encoding={layout_encoding!r} puts the hint at 1/{HINT_IMAGE_DOWNSAMPLE[layout_encoding]} of "
            f"the image, which no stride-2 hint encoder maps to the latent size 1/{vae_scale_factor}"
        )
    return n


def mirror_up_block_types(down_block_types: Sequence[str]) -> Tuple[str, ...]:
    """The up block types matching `down_block_types` (a ControlNet's UNetConfig has no up path of its own)."""
    return tuple("CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in reversed(down_block_types))


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """ControlNet hyper-parameters.

    unet: the UNet whose encoder half this ControlNet copies. Decoder-only
        fields (sample_size, out_channels, up_block_types,
        center_input_sample) are normalised in __post_init__ because
        diffusers' ControlNetModel has none of them; the Flax-only fields
        (dtype, param_dtype, remat, attention_impl) are used as they are.
    layout_encoding: "colour" or "class_embedding" (module docstring).
    conditioning_channels: hint channels: 3 for "colour", D (the class
        embedding width) for "class_embedding".
    conditioning_embedding_out_channels: hint encoder channels; their count
        fixes the number of stride-2 convs (len - 1), which must take the hint
        resolution to the latent resolution: with the SD VAE (8x) 3 for
        "colour" (image -> 1/8), 1 for "class_embedding" (1/4 -> 1/8).
    vae_scale_factor: image pixels per latent pixel (8 for Stable
        Diffusion's VAE). Not a diffusers key and no parameter depends on it:
        it only validates the hint encoder's downsampling
        (2 ** (len(conditioning_embedding_out_channels) - 1) * image pixels
        per hint pixel == vae_scale_factor).
        `sdsup.convert.controlnet.controlnet_config_from_diffusers` infers it.
    """

    unet: UNetConfig = STABLE_DIFFUSION_1_5
    layout_encoding: str = "colour"
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: Tuple[int, ...] = COLOUR_HINT_CHANNELS
    vae_scale_factor: int = VAE_SCALE_FACTOR

    def __post_init__(self):
        object.__setattr__(self, "conditioning_embedding_out_channels", tuple(self.conditioning_embedding_out_channels))
        if not isinstance(self.unet, UNetConfig):
            raise TypeError(f"ControlNetConfig.unet must be a UNetConfig, got {type(self.unet).__name__}")
        if self.layout_encoding not in LAYOUT_ENCODINGS:
            raise ValueError(f"layout_encoding={self.layout_encoding!r}; expected one of {LAYOUT_ENCODINGS}")
        if not isinstance(self.unet.layers_per_block, int):
            raise ValueError(
                f"layers_per_block={self.unet.layers_per_block}: diffusers' ControlNetModel only supports one "
                "int for all blocks"
            )
        if not self.conditioning_embedding_out_channels or min(self.conditioning_embedding_out_channels) < 1:
            raise ValueError(
                f"conditioning_embedding_out_channels={self.conditioning_embedding_out_channels} must be non-empty "
                "and positive"
            )
        if self.conditioning_channels < 1:
            raise ValueError(f"conditioning_channels={self.conditioning_channels} must be positive")
        if self.layout_encoding == "colour" and self.conditioning_channels != 3:
            raise ValueError(f"layout_encoding='colour' takes an RGB hint: conditioning_channels must be 3, "
                             f"got {self.conditioning_channels}")
        want = _hint_strides(self.layout_encoding, self.vae_scale_factor)
        if self.hint_downsample != 2**want:
            raise ValueError(
                f"layout_encoding={self.layout_encoding!r} with vae_scale_factor={self.vae_scale_factor} needs a "
                f"hint encoder that downsamples {2 ** want}x ({want} stride-2 convs, i.e. {want + 1} "
                f"conditioning_embedding_out_channels); got {self.conditioning_embedding_out_channels} "
                f"({self.hint_downsample}x)"
            )
        unet = dataclasses.replace(
            self.unet,
            sample_size=None,
            out_channels=self.unet.in_channels,
            up_block_types=mirror_up_block_types(self.unet.down_block_types),
            center_input_sample=False,
        )
        object.__setattr__(self, "unet", unet)

    def __getattr__(self, name: str):
        # Only called when normal lookup fails: forward the UNet's fields and
        # per-block helpers so UNetEncoderMixin can read `self.config.<x>`.
        if name in _DELEGATED:
            return getattr(object.__getattribute__(self, "unet"), name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # ------------------------------------------------------------------
    @property
    def hint_downsample(self) -> int:
        """Hint pixels per latent pixel: 2 ** (number of stride-2 convs in the hint encoder)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @property
    def hint_image_downsample(self) -> int:
        """Image pixels per hint pixel: 1 for "colour", 4 for "class_embedding"."""
        return HINT_IMAGE_DOWNSAMPLE[self.layout_encoding]

    @property
    def skip_channels(self) -> Tuple[int, ...]:
        """Channels of each down residual (conv_in's first), = controlnet_down_blocks widths."""
        out = [self.unet.block_out_channels[0]]
        n = len(self.unet.block_out_channels)
        for i, c in enumerate(self.unet.block_out_channels):
            out += [c] * self.unet.layers(i)
            if i < n - 1:
                out.append(c)
        return tuple(out)

    @classmethod
    def from_unet(
        cls,
        unet: UNetConfig,
        layout_encoding: str = "colour",
        class_embedding_dim: Optional[int] = None,
        conditioning_embedding_out_channels: Optional[Sequence[int]] = None,
        vae_scale_factor: int = VAE_SCALE_FACTOR,
    ) -> "ControlNetConfig":
        """The conditioner for `unet` with the default hint encoder of `layout_encoding`.

        "class_embedding" needs `class_embedding_dim` (D, e.g. 768 for SD-1.5's
        CLIP). Default hint channels: (16, 32, 96, 256) ("colour") and
        (512, 256) ("class_embedding") for the 8x SD VAE; for another
        `vae_scale_factor` the same sequences cut (or, for class_embedding,
        extended with 256s) to the needed number of stride-2 convs.
        """
        if layout_encoding not in LAYOUT_ENCODINGS:
            raise ValueError(f"layout_encoding={layout_encoding!r}; expected one of {LAYOUT_ENCODINGS}")
        if layout_encoding == "class_embedding":
            if class_embedding_dim is None:
                raise ValueError("layout_encoding='class_embedding' needs class_embedding_dim")
            channels = class_embedding_dim
        else:
            if class_embedding_dim not in (None, 3):
                raise ValueError(f"layout_encoding={layout_encoding!r} takes no class_embedding_dim")
            channels = 3
        if conditioning_embedding_out_channels:
            hint = tuple(conditioning_embedding_out_channels)
        else:
            n = _hint_strides(layout_encoding, vae_scale_factor) + 1
            default = DEFAULT_HINT_CHANNELS[layout_encoding]
            hint = (default + (default[-1],) * n)[:n]
        return cls(unet, layout_encoding, channels, hint, vae_scale_factor)


# A ControlNet for Stable Diffusion 1.5 in the sd-controlnet-seg format.
STABLE_DIFFUSION_1_5_SEG = ControlNetConfig()


# ---------------------------------------------------------------------------
# Conditioning tensors from label maps.


def _concrete(x) -> Optional[np.ndarray]:
    """x as numpy when it is a concrete value, None when traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _gather_rows(table: Array, labels: Array, ignore_id: Optional[int]) -> Array:
    """table[labels] with the zero vector where labels == ignore_id or is outside [0, N)."""
    n = table.shape[0]
    concrete = _concrete(labels)
    if concrete is not None:
        bad = (concrete < 0) | (concrete >= n)
        if ignore_id is not None:
            bad &= concrete != ignore_id
        if bad.any():
            raise ValueError(
                f"label ids {sorted(set(np.unique(concrete[bad]).tolist()))[:10]} are outside [0, {n}) "
                f"and are not ignore_id={ignore_id}"
            )
    labels = jnp.asarray(labels)
    valid = (labels >= 0) & (labels < n)
    if ignore_id is not None:
        valid &= labels != ignore_id
    rows = jnp.take(jnp.asarray(table), jnp.clip(labels, 0, n - 1), axis=0)
    return jnp.where(valid[..., None], rows, jnp.zeros((), rows.dtype))


def _check_labels(labels) -> None:
    if jnp.ndim(labels) != 3:
        raise ValueError(f"labels must be [B, H, W] class ids, got shape {jnp.shape(labels)}")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {jnp.result_type(labels)}")


def colour_hint(labels: Array, palette: Array, ignore_id: Optional[int] = None) -> Array:
    """[B, H, W] int class ids -> [B, H, W, 3] float32 RGB in [0, 1] ("colour" encoding).

    Pixel value = palette[id] / 255 (palette [N, 3] uint8, RGB), the float32
    division rounded as IEEE division (torch's `palette.float() / 255`) when
    the palette is concrete; `ignore_id` (and, when traced, any id outside
    [0, N)) is black. This is the image a diffusers ControlNet pipeline
    receives as `image=` for sd-controlnet-seg, channel-last; diffusers
    wants it [B, 3, H, W].
    """
    _check_labels(labels)
    if jnp.ndim(palette) != 2 or jnp.shape(palette)[1] != 3:
        raise ValueError(f"palette must be [N, 3], got shape {jnp.shape(palette)}")
    if jnp.result_type(palette) != jnp.uint8:
        raise ValueError(f"palette must be uint8 RGB, got dtype {jnp.result_type(palette)}")
    concrete = _concrete(palette)
    if concrete is not None:
        # Divide the [N, 3] table in numpy: XLA may turn x / 255 into x * (1 / 255), 1 ulp off.
        table = concrete.astype(np.float32) / np.float32(255.0)
    else:
        table = jnp.asarray(palette).astype(jnp.float32) / 255.0
    return _gather_rows(table, labels, ignore_id)


def class_embedding_hint(labels: Array, table: Array, ignore_id: Optional[int] = None) -> Array:
    """[B, H, W] int class ids -> [B, H/4, W/4, D] ("class_embedding" encoding, ALDM).

    Exact rule: H and W divisible by 4; out[b, i, j] = table[labels[b, 4 i, 4 j]],
    the zero vector where that id is `ignore_id` (or, when traced, outside
    [0, N)). Identical to PyTorch's `F.interpolate(labels[:, None].float(),
    size=(H // 4, W // 4), mode="nearest")` followed by the table lookup.
    Output dtype is the table's.
    """
    _check_labels(labels)
    table = jnp.asarray(table)
    if table.ndim != 2:
        raise ValueError(f"table must be [N, D], got shape {table.shape}")
    f = HINT_IMAGE_DOWNSAMPLE["class_embedding"]
    h, w = jnp.shape(labels)[1:]
    if h % f or w % f:
        raise ValueError(f"label map size {h}x{w} is not divisible by {f}")
    return _gather_rows(table, labels[:, ::f, ::f], ignore_id)


def layout_hint(labels: Array, config: ControlNetConfig, *, palette=None, table=None, ignore_id=None) -> Array:
    """The conditioning tensor of `config.layout_encoding` (colour_hint or class_embedding_hint)."""
    if config.layout_encoding == "colour":
        if palette is None:
            raise ValueError("layout_encoding='colour' needs a palette")
        return colour_hint(labels, palette, ignore_id)
    if table is None:
        raise ValueError("layout_encoding='class_embedding' needs a class embedding table")
    if jnp.shape(table)[1] != config.conditioning_channels:
        raise ValueError(f"class embedding table width {jnp.shape(table)[1]} != conditioning_channels "
                         f"{config.conditioning_channels}")
    return class_embedding_hint(labels, table, ignore_id)


# ---------------------------------------------------------------------------
# Model.


class ControlNetConditioningEmbedding(nn.Module):
    """diffusers' ControlNetConditioningEmbedding (the hint encoder) over NHWC."""

    conditioning_embedding_channels: int
    block_out_channels: Tuple[int, ...]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = self.block_out_channels
        self.conv_in = Conv(ch[0], **kw)
        blocks = []
        for i in range(len(ch) - 1):
            blocks.append(Conv(ch[i], **kw))
            blocks.append(Conv(ch[i + 1], strides=(2, 2), **kw))
        self.blocks = blocks
        self.conv_out = Conv(self.conditioning_embedding_channels, kernel_init=nn.initializers.zeros, **kw)

    def __call__(self, x: Array) -> Array:
        x = nn.silu(self.conv_in(x))
        for block in self.blocks:
            x = nn.silu(block(x))
        return self.conv_out(x)


def _zero_conv(features: int, **kw) -> Conv:
    return Conv(features, kernel_size=(1, 1), padding=((0, 0), (0, 0)), kernel_init=nn.initializers.zeros, **kw)


class ControlNetModel(UNetEncoderMixin, nn.Module):
    """diffusers' ControlNetModel over NHWC.

    __call__(sample [B, h, w, in_channels], timesteps (scalar, [1] or [B]),
             encoder_hidden_states [B, T, cross_attention_dim],
             controlnet_cond [B or 1, h * k, w * k, conditioning_channels] with k = config.hint_downsample,
             conditioning_scale=1.0)
      -> (down_block_res_samples: tuple of config.num_skips NHWC arrays, mid_block_res_sample)

    ready for UNet2DConditionModel(down_block_additional_residuals=...,
    mid_block_additional_residual=...). guess mode and global pooling are
    not implemented.
    """

    config: ControlNetConfig

    def setup(self):
        cfg = self.config
        kw = self._kw()
        self.setup_encoder()
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels, **kw
        )
        self.controlnet_down_blocks = [_zero_conv(c, **kw) for c in cfg.skip_channels]
        self.controlnet_mid_block = _zero_conv(cfg.block_out_channels[-1], **kw)

    def __call__(
        self,
        sample: Array,
        timesteps: Array,
        encoder_hidden_states: Array,
        controlnet_cond: Array,
        conditioning_scale: Union[float, Array] = 1.0,
    ) -> Tuple[Tuple[Array, ...], Array]:
        cfg = self.config
        dtype = self.compute_dtype
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be [B, h, w, {cfg.in_channels}], got {sample.shape}")
        b, h, w, _ = sample.shape
        k = cfg.hint_downsample
        want = (h * k, w * k, cfg.conditioning_channels)
        if controlnet_cond.ndim != 4 or tuple(controlnet_cond.shape[1:]) != want or controlnet_cond.shape[0] not in (1, b):
            raise ValueError(
                f"controlnet_cond must be [{b}, {want[0]}, {want[1]}, {want[2]}] ({cfg.layout_encoding!r} hint, "
                f"{k}x the latent size {h}x{w}, NHWC), got {controlnet_cond.shape}"
            )
        sample = sample.astype(dtype)
        context = encoder_hidden_states.astype(dtype)
        emb = self.embed_time(timesteps, b)
        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond.astype(dtype))
        h, skips = self.run_down_blocks(h, emb, context)
        h = self.run_mid_block(h, emb, context)
        scale = jnp.asarray(conditioning_scale, dtype)
        down = tuple(conv(s) * scale for conv, s in zip(self.controlnet_down_blocks, skips))
        mid = self.controlnet_mid_block(h) * scale
        return down, mid

    def init_params(self, rng: Array, batch_size: int = 1, latent_size: Optional[int] = None) -> Dict[str, Any]:
        """model.init on dummy inputs of the right shapes (boxed params, {'params': ...})."""
        return self.init(rng, *dummy_inputs(self.config, batch_size, latent_size))


def dummy_inputs(config: ControlNetConfig, batch_size: int = 1, latent_size: Optional[int] = None):
    """(sample, timesteps, encoder_hidden_states, controlnet_cond) zeros for init / eval_shape."""
    s = latent_size or 2 ** (len(config.block_out_channels) - 1)
    k = config.hint_downsample
    return (
        jnp.zeros((batch_size, s, s, config.in_channels)),
        jnp.zeros((batch_size,)),
        jnp.zeros((batch_size, 1, config.cross_attention_dim)),
        jnp.zeros((batch_size, s * k, s * k, config.conditioning_channels)),
    )


# ---------------------------------------------------------------------------
# Initialisation from the UNet.


class ControlNetInitError(SdsupError, ValueError):
    """The UNet's parameters do not fit the ControlNet's encoder: a parameter path or shape differs."""


def _value(leaf):
    return leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf


def controlnet_params_from_unet(
    unet_params: Mapping[str, Any], controlnet_params: Mapping[str, Any], config: ControlNetConfig
) -> Dict[str, Any]:
    """ControlNet params whose encoder is the UNet's, everything else kept.

    Copy rule: the subtrees `encoder_param_names(config.unet)` (conv_in,
    time_embedding, down_blocks_*, mid_block) are taken from `unet_params`;
    the hint encoder (controlnet_cond_embedding) and the zero convs
    (controlnet_down_blocks_*, controlnet_mid_block) come from
    `controlnet_params` unchanged. Copied values get new buffers (so donating
    the ControlNet's params never invalidates the UNet's) in the ControlNet's
    dtype, and keep the ControlNet's boxing (nn.Partitioned) if it has one.

    Both trees may be wrapped in {'params': ...}; the result is wrapped iff
    `controlnet_params` is. Raises ControlNetInitError naming every parameter
    whose path or shape differs (e.g. an inpainting UNet's 9-channel conv_in).
    """
    wrapped = set(controlnet_params) == {"params"}
    cn = controlnet_params["params"] if wrapped else controlnet_params
    un = unet_params["params"] if set(unet_params) == {"params"} else unet_params
    out = dict(cn)
    problems = []
    for name in encoder_param_names(config.unet):
        if name not in un:
            problems.append(f"UNet params lack {name}")
            continue
        if name not in cn:
            problems.append(f"ControlNet params lack {name}")
            continue
        src, dst = flatten_dict({name: un[name]}), flatten_dict({name: cn[name]})
        for path in sorted(set(src) ^ set(dst)):
            where = "UNet" if path in src else "ControlNet"
            problems.append(f"{'/'.join(path)} only in the {where} params")
        copied = {}
        for path in sorted(set(src) & set(dst)):
            s, d = _value(src[path]), dst[path]
            dv = _value(d)
            if tuple(s.shape) != tuple(dv.shape):
                problems.append(f"{'/'.join(path)}: UNet shape {tuple(s.shape)} != ControlNet shape {tuple(dv.shape)}")
                continue
            v = jnp.array(s, dtype=dv.dtype, copy=True)
            copied[path] = d.replace_boxed(v) if isinstance(d, nn.meta.AxisMetadata) else v
        out[name] = unflatten_dict(copied)[name] if copied else {}
    if problems:
        raise ControlNetInitError("cannot initialise the ControlNet from the UNet: " + "; ".join(problems))
    return {"params": out} if wrapped else out
