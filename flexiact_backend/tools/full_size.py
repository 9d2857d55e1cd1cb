"""CogVideoX-5B-I2V at its published configs with random weights, built in code (nothing downloads).

The compute and memory of a step are the real model's; only the numbers in the weights differ. Reduced sizes
(`layers`, `frames`, `height`, `width`) keep every width at full size so a CPU can run the same code end to end; the
text encoder keeps T5-XXL's width with its depth scaled like the transformer's (24 layers at 42).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel
from transformers import T5Config, T5EncoderModel

from ..generation import FlexiActGenerator, configure_vae
from ..model import attach_flexiact
from ..model_info import ModelInfo
from ..requirements import require_memory_saving
from ..tiny import (TINY_FRAMES, TINY_HEIGHT, TINY_MODEL_ID, TINY_WIDTH, build_tiny_pipeline, make_scheduler,
                    make_tokenizer)

FULL_LAYERS, FULL_TEXT_LAYERS = 42, 24
FULL_FRAMES, FULL_HEIGHT, FULL_WIDTH = 49, 480, 720
TEXT_LENGTH = 226


@dataclass(frozen=True)
class FullSize:
    """The size to build: the published model by default; smaller numbers for CPU runs and CI."""

    layers: int = FULL_LAYERS
    frames: int = FULL_FRAMES
    height: int = FULL_HEIGHT
    width: int = FULL_WIDTH

    def __post_init__(self) -> None:
        if self.layers < 1 or (self.frames - 1) % 4 or self.height % 16 or self.width % 16:
            raise ValueError(f"need layers >= 1, frames = 4k+1 and height, width multiples of 16; got {self}")

    @property
    def text_layers(self) -> int:
        return max(1, round(FULL_TEXT_LAYERS * self.layers / FULL_LAYERS))

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // 4 + 1

    def to_dict(self) -> dict:
        return {**asdict(self), "text_layers": self.text_layers}


def text_encoder_config(size: FullSize) -> T5Config:
    """google/t5-v1_1-xxl's encoder (CogVideoX's text encoder), `size.text_layers` deep."""
    return T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=size.text_layers, num_heads=64,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                    layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False, decoder_start_token_id=0,
                    pad_token_id=0, eos_token_id=1)


def build_modules(size: FullSize, dtype: torch.dtype) -> tuple[T5EncoderModel, AutoencoderKLCogVideoX, CogVideoXTransformer3DModel]:
    """Text encoder, VAE and transformer at the published configs (under `torch.device("meta")` they cost nothing)."""
    text_encoder = T5EncoderModel(text_encoder_config(size)).to(dtype)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(128, 256, 256, 512), latent_channels=16, layers_per_block=3, act_fn="silu", norm_eps=1e-6,
        norm_num_groups=32, temporal_compression_ratio=4, sample_height=size.height, sample_width=size.width, scaling_factor=0.7,
    ).to(dtype)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16, flip_sin_to_cos=True, freq_shift=0,
        time_embed_dim=512, text_embed_dim=4096, num_layers=size.layers, dropout=0.0, attention_bias=True,
        sample_width=size.width // 8, sample_height=size.height // 8, sample_frames=size.frames, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=TEXT_LENGTH, activation_fn="gelu-approximate",
        timestep_activation_fn="silu", norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
        temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
    ).to(dtype)
    for module in (text_encoder, vae, transformer):
        module.requires_grad_(False).eval()
    return text_encoder, vae, transformer


def build_full_generator(size: FullSize, device: torch.device, dtype: torch.dtype, *, memory_saving: bool = False,
                         compile: bool = False) -> FlexiActGenerator:
    """A `FlexiActGenerator` over the random-weight model, FlexiAct attached (rank 64, alpha 32, 226 tokens); its
    RefAdapter is the LoRA's random initialisation (it folds and costs as the published one does)."""
    if memory_saving:
        require_memory_saving(device)
    with torch.device("cpu" if memory_saving else device):  # memory saving keeps idle models in CPU memory
        text_encoder, vae, transformer = build_modules(size, dtype)
    pipe = CogVideoXImageToVideoPipeline(tokenizer=make_tokenizer(), text_encoder=text_encoder, vae=vae,
                                         transformer=transformer, scheduler=make_scheduler())
    info = ModelInfo(id="random-cogvideox-5b-i2v", tiny=False, width=size.width, height=size.height, frames=size.frames, fps=8.0)
    return random_generator(pipe, info, device, memory_saving=memory_saving, compile=compile)


def build_tiny_generator(device: torch.device, dtype: torch.dtype, *, memory_saving: bool = False,
                         compile: bool = False) -> FlexiActGenerator:
    """The tiny model wrapped as `build_full_generator` wraps the full one: the same code paths in seconds."""
    if memory_saving:
        require_memory_saving(device)
    pipe = build_tiny_pipeline().to(dtype=dtype)
    info = ModelInfo(id=TINY_MODEL_ID, tiny=True, width=TINY_WIDTH, height=TINY_HEIGHT, frames=TINY_FRAMES, fps=8.0,
                     rank=8, alpha=4, num_layers=pipe.transformer.config.num_layers,
                     inner_dim=pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim)
    return random_generator(pipe, info, device, memory_saving=memory_saving, compile=compile)


def random_generator(pipe: CogVideoXImageToVideoPipeline, info: ModelInfo, device: torch.device, *,
                     memory_saving: bool, compile: bool) -> FlexiActGenerator:
    """FlexiAct attached to `pipe` as `FlexiActGenerator.from_pretrained` does, placed on `device`."""
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    configure_vae(pipe.vae)
    adapter = attach_flexiact(pipe.transformer, rank=info.rank, alpha=info.alpha, num_motion_tokens=info.num_motion_tokens)
    if memory_saving:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    generator = FlexiActGenerator(pipe, adapter, info, device, refadapter="random initialisation")
    if compile:
        generator.compile_and_warm_up()
    return generator
