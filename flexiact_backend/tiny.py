"""A random-weight CogVideoX-I2V pipeline built entirely in code, for tests, the demo and CPU machines.

It keeps the real model's constraints (learned positional embeddings pin its size, 4k+1 frames, image latent
concatenated on channels, T5 text of exactly `max_text_seq_length` tokens) at 96x64 pixels and 9 frames, so a
generation takes about a second on two CPU cores. No file is downloaded: the tokenizer's vocabulary is made here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel
from transformers import PreTrainedTokenizerBase, T5Config, T5EncoderModel, T5Tokenizer

from .model_info import ADAPTER_CONFIG_NAME

TINY_MODEL_ID = "flexiact/tiny-random-cogvideox-i2v"
TINY_WIDTH, TINY_HEIGHT, TINY_FRAMES = 96, 64, 9
TEXT_LEN = 226
_TEXT_DIM = 32
_LATENT_CHANNELS = 4
_WORDS = "a the of and to in is on with walks runs jumps waves turns dances camera moves forward person dog cat figure".split()


def make_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer over letters and a few words; built from an in-memory vocabulary."""
    pieces = ["▁" + w for w in _WORDS] + ["▁"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TEXT_LEN)


def build_tiny_pipeline(seed: int = 0, heads: int = 2,
                        tokenizer: PreTrainedTokenizerBase | None = None) -> CogVideoXImageToVideoPipeline:
    """The tiny pipeline in memory, weights drawn from `seed`; `heads` of 16 channels each (Ulysses over N ranks
    needs N to divide the head count); the text encoder's vocabulary fits `tokenizer`."""
    torch.manual_seed(seed)
    tokenizer = tokenizer or make_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=_TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=_LATENT_CHANNELS, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4, sample_height=2 * TINY_HEIGHT, sample_width=2 * TINY_WIDTH, scaling_factor=0.7,
    )  # tiles are half the sample size (the hub's 480x720 gives 240x360): here they cover the frame, so tiling is
    # on as for the real model but one tile, which keeps tests quick; test_first_contact sets the hub's ratio
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=16, in_channels=2 * _LATENT_CHANNELS, out_channels=_LATENT_CHANNELS,
        time_embed_dim=16, text_embed_dim=_TEXT_DIM, num_layers=2, sample_width=TINY_WIDTH // 8,
        sample_height=TINY_HEIGHT // 8, sample_frames=TINY_FRAMES, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=TEXT_LEN, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
    )
    return CogVideoXImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                         scheduler=make_scheduler())


def make_scheduler() -> CogVideoXDPMScheduler:
    """CogVideoX-5B-I2V's scheduler settings in the DPM form FlexiAct samples with."""
    return CogVideoXDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True, timestep_spacing="trailing",
        snr_shift_scale=1.0, clip_sample=False,
    )


def make_tiny_model(directory: str | Path, seed: int = 0, heads: int = 2) -> Path:
    """Write the tiny pipeline in diffusers format to `directory`, atomically (a temp folder, then a rename)."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_tiny_pipeline(seed, heads).save_pretrained(staging)
        (staging / ADAPTER_CONFIG_NAME).write_text(json.dumps(
            {"model_id": TINY_MODEL_ID, "tiny": True, "rank": 8, "alpha": 4, "num_motion_tokens": TEXT_LEN, "fps": 8}, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_tiny_model(data_dir: str | Path) -> Path:
    """The tiny model under `data_dir`, built on first use."""
    directory = Path(data_dir) / "tiny-model"
    if not (directory / ADAPTER_CONFIG_NAME).is_file():
        make_tiny_model(directory)
    return directory
