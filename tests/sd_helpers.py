"""A tiny random-weight Stable Diffusion pipeline in diffusers' own directory layout, for tests of the real path."""

import diffusers
import numpy as np
import torch
import transformers

from helpers import write_clip_tokenizer


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every tensor random (zero-initialised convs included), O(1) activations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if ("norm" in name and name.endswith("weight")) or "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif "embedding" in name and p.ndim == 2 and "linear" not in name:
                p.copy_(0.5 * noise)
            elif name.endswith("weight") and p.ndim > 1:
                p.copy_(noise / int(np.prod(p.shape[1:])) ** 0.5)
            else:
                p.copy_(0.2 * noise)


class TinyStableDiffusion:
    """A random-weight Stable Diffusion + colour ControlNet pipeline saved by diffusers (safetensors) under
    root/sd: SD-1.5's layout and scheduler, toy widths (4x VAE downsampling, 32-wide text states)."""

    def __init__(self, root, image: int = 32):
        self.dir = str(root / "sd")
        tok_dir = write_clip_tokenizer(str(root / "clip_tokenizer"))
        tokenizer = transformers.CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
        torch.manual_seed(0)
        self.unet = diffusers.UNet2DConditionModel(
            sample_size=image // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2).eval()
        self.vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1, norm_num_groups=8, sample_size=image, scaling_factor=0.5).eval()
        self.controlnet = diffusers.ControlNetModel.from_unet(
            self.unet, conditioning_embedding_out_channels=(8, 16, 16)).eval()
        self.text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
        for i, m in enumerate((self.unet, self.vae, self.controlnet, self.text_encoder)):
            randomize(m, seed=10 + i)
        with torch.no_grad():
            # Keep decoded images mostly inside [-1, 1], so clipping hides nothing ...
            self.vae.decoder.conv_out.weight.mul_(0.3)
            self.vae.decoder.conv_out.bias.zero_()
            # ... and make the layout matter as much as the prompt.
            self.controlnet.controlnet_cond_embedding.conv_out.weight.mul_(8.0)
        self.scheduler = diffusers.DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
            set_alpha_to_one=False, steps_offset=1)
        self.tokenizer = tokenizer
        pipe = diffusers.StableDiffusionControlNetPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=tokenizer, unet=self.unet,
            controlnet=self.controlnet, scheduler=self.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.save_pretrained(self.dir, safe_serialization=True)
        self.models = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                       "controlnet": self.controlnet}
