"""The tiny model laid out exactly as the hub's THUDM/CogVideoX-5b-I2V folder, with the authors' `.pt` files.

Why: the tiny model of `tiny.py` is saved the way this project expects, so it never meets what a user's first
download does: a SentencePiece `tokenizer/spiece.model` with no `tokenizer.json` (transformers converts it at
load time, with sentencepiece and protobuf), bf16 weights in several safetensors shards with index files, a
scheduler config naming CogVideoXDDIMScheduler, no `flexiact.json`, the RefAdapter as a torch pickle at the
folder's root and published actions as pickles beside it. Built offline in a few seconds; the layout is
`download`'s (`DIR/CogVideoX-5b-I2V/`, `DIR/actions/`).
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import CogVideoXDDIMScheduler
from transformers import T5Tokenizer

from .model_info import REFADAPTER_FILES
from .model.processor import LORA_NAMES
from .model_info import REAL_MODEL_ID
from .tiny import TEXT_LEN, build_tiny_pipeline

#: The hub's T5 tokenizer has 100 sentinel tokens after its SentencePiece vocabulary.
EXTRA_IDS = 100
#: Small enough that the transformer and the text encoder are written in several shards, as on the hub.
SHARD_SIZE = "12KB"
#: The published format's LoRA rank and motion-token count (no flexiact.json: the reader's defaults apply).
RANK, MOTION_TOKENS = 64, 226
_CORPUS = ("a person walks forward and waves", "the dog runs and jumps on the grass",
           "a cat turns and dances while the camera moves", "a figure jumps, spins and waves both arms",
           "someone kicks a ball across the room quickly")


@dataclass(frozen=True)
class HubFolder:
    """Where the pieces are: `model` (pass to --model), its RefAdapter `.pt`, and a published action `.pt`."""

    root: Path
    model: Path
    refadapter: Path
    action: Path


def train_sentencepiece(vocab_size: int = 64) -> bytes:
    """A unigram SentencePiece model (the bytes of a `spiece.model`) trained on a few captions."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    return model.getvalue()


def write_hub_tokenizer(directory: Path, spiece: bytes) -> None:
    """The hub's tokenizer files around `spiece`: T5Tokenizer config (100 extra ids, 226 tokens), the special
    tokens map and the added tokens, and no tokenizer.json."""
    import sentencepiece

    size = sentencepiece.SentencePieceProcessor(model_proto=spiece).get_piece_size()
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(spiece)
    (directory / "added_tokens.json").write_text(json.dumps({t: size + EXTRA_IDS - 1 - i for i, t in enumerate(extra)}))
    (directory / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": extra, **special}))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "additional_special_tokens": extra, "clean_up_tokenization_spaces": True, "extra_ids": EXTRA_IDS, "legacy": True,
        "model_max_length": TEXT_LEN, "sp_model_kwargs": {}, "tokenizer_class": "T5Tokenizer", **special}, indent=2))


def published_refadapter(num_layers: int, inner_dim: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A RefAdapter in the authors' `refnetlora_step40000_model.pt` format (bf16, rank 64), random but non-zero."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(num_layers):
        for name in LORA_NAMES:
            prefix = f"transformer_blocks.{i}.attn1.processor.{name}"
            state[f"{prefix}.down.weight"] = (torch.randn(RANK, inner_dim, generator=g) / RANK).bfloat16()
            state[f"{prefix}.up.weight"] = (torch.randn(inner_dim, RANK, generator=g) * 0.05).bfloat16()
    return state


def published_action(num_layers: int, inner_dim: int, seed: int = 2) -> dict[str, torch.Tensor]:
    """An FAE action in the authors' format: one [1, 226, inner_dim] token tensor per layer (bf16)."""
    g = torch.Generator().manual_seed(seed)
    return {f"transformer_blocks.{i}.attn1.processor.motion_inversion_tokens":
            (torch.randn(1, MOTION_TOKENS, inner_dim, generator=g) * 0.1).bfloat16() for i in range(num_layers)}


def make_hub_folder(directory: str | Path, seed: int = 0, *, refadapter: bool = True) -> HubFolder:
    """Write the hub-shaped tiny model to `directory`/CogVideoX-5b-I2V and a published action to
    `directory`/actions; `refadapter=False` leaves the RefAdapter out (a download that lacks it)."""
    root = Path(directory)
    model = root / REAL_MODEL_ID.split("/")[1]
    if model.exists():
        shutil.rmtree(model)
    spiece = train_sentencepiece()
    staging = root / ".tokenizer"
    write_hub_tokenizer(staging, spiece)
    pipe = build_tiny_pipeline(seed, tokenizer=T5Tokenizer.from_pretrained(staging))
    pipe.scheduler = CogVideoXDDIMScheduler.from_config(pipe.scheduler.config)  # what the hub's config names
    pipe.to(torch.bfloat16)
    pipe.save_pretrained(model, max_shard_size=SHARD_SIZE)
    shutil.rmtree(model / "tokenizer")
    shutil.move(staging, model / "tokenizer")
    config = pipe.transformer.config
    layers, inner = config.num_layers, config.num_attention_heads * config.attention_head_dim
    refadapter_path = model / REFADAPTER_FILES[1]
    if refadapter:
        torch.save(published_refadapter(layers, inner, seed + 1), refadapter_path)
    action = root / "actions" / "jump.pt"
    action.parent.mkdir(parents=True, exist_ok=True)
    torch.save(published_action(layers, inner, seed + 2), action)
    return HubFolder(root, model, refadapter_path, action)
