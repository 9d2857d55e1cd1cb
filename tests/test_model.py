"""FlexiAct attention against a naive dense reference written here, checkpoints, folding and memory shape."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb, get_3d_rotary_pos_embed
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from flexiact_backend.errors import CheckpointError
from flexiact_backend.model import ATTENTION_BACKENDS, FlexiActAdapter, attach_flexiact, biased_attention

SHAPES = {
    "two-layer": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, sample_width=6, sample_height=4, sample_frames=9, text_len=12),
    "three-layer-wide": dict(num_layers=3, num_attention_heads=3, attention_head_dim=16, sample_width=4, sample_height=4, sample_frames=5, text_len=7),
}
MOTION = 5
RANK, ALPHA = 4, 2


def make_transformer(shape: dict) -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=shape["num_attention_heads"], attention_head_dim=shape["attention_head_dim"], in_channels=8,
        out_channels=4, time_embed_dim=8, text_embed_dim=16, num_layers=shape["num_layers"], sample_width=shape["sample_width"],
        sample_height=shape["sample_height"], sample_frames=shape["sample_frames"], patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=shape["text_len"], use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
    ).eval()


def inputs(transformer: CogVideoXTransformer3DModel, shape: dict, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    frames = (shape["sample_frames"] - 1) // 4 + 1
    h, w = shape["sample_height"], shape["sample_width"]
    cos, sin = get_3d_rotary_pos_embed(shape["attention_head_dim"], ((0, 0), (h // 2, w // 2)), (h // 2, w // 2), frames)
    return dict(
        hidden_states=torch.randn(batch, frames, 8, h, w, generator=g),
        encoder_hidden_states=torch.randn(batch, shape["text_len"], 16, generator=g),
        timestep=torch.tensor([900] * batch),
        image_rotary_emb=(cos, sin),
        return_dict=False,
    )


def randomise(adapter: FlexiActAdapter, seed: int = 2) -> None:
    """Non-zero LoRA (up starts at zero) and motion tokens, so every term of the attention matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.processors:
            p.motion_inversion_tokens.copy_(torch.randn(p.motion_inversion_tokens.shape, generator=g))
            for lora in (p.lora_q, p.lora_k, p.lora_v, p.lora_proj):
                lora.down.weight.copy_(torch.randn(lora.down.weight.shape, generator=g) * 0.3)
                lora.up.weight.copy_(torch.randn(lora.up.weight.shape, generator=g) * 0.3)


class NaiveFlexiAct:
    """FlexiAct's attention spelled out: dense logits, explicit additive bias, RoPE on video only."""

    def __init__(self, tokens: torch.Tensor, loras: dict, lora_factor: float, bias: float | None) -> None:
        self.tokens, self.loras, self.lora_factor, self.bias = tokens, loras, lora_factor, bias

    def linear(self, layer: torch.nn.Linear, name: str, x: torch.Tensor) -> torch.Tensor:
        down, up = self.loras[name]
        return x @ layer.weight.T + layer.bias + self.lora_factor * (x @ down.T @ up.T)

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        b, t, m = hidden_states.shape[0], encoder_hidden_states.shape[1], self.tokens.shape[1]
        x = torch.cat([encoder_hidden_states, self.tokens.expand(b, -1, -1), hidden_states], dim=1)
        heads = attn.heads
        q, k, v = (self.linear(layer, n, x) for layer, n in ((attn.to_q, "lora_q"), (attn.to_k, "lora_k"), (attn.to_v, "lora_v")))
        q, k, v = (y.view(b, y.shape[1], heads, -1).transpose(1, 2) for y in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        q = torch.cat([q[:, :, : t + m], apply_rotary_emb(q[:, :, t + m :], image_rotary_emb)], dim=2)
        k = torch.cat([k[:, :, : t + m], apply_rotary_emb(k[:, :, t + m :], image_rotary_emb)], dim=2)
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        if self.bias is not None:
            logits[:, :, t + m :, t : t + m] += self.bias
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, x.shape[1], -1)
        out = self.linear(attn.to_out[0], "lora_proj", out)
        return out[:, t + m :], out[:, :t]


def naive_transformer(plain: CogVideoXTransformer3DModel, adapter: FlexiActAdapter, lora_weight: float, bias: float | None):
    naive = copy.deepcopy(plain)
    for block, p in zip(naive.transformer_blocks, adapter.processors):
        loras = {n: (getattr(p, n).down.weight.detach(), getattr(p, n).up.weight.detach()) for n in ("lora_q", "lora_k", "lora_v", "lora_proj")}
        block.attn1.set_processor(NaiveFlexiAct(p.motion_inversion_tokens.detach(), loras, ALPHA / RANK * lora_weight, bias))
    return naive


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("lora_weight", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("bias", [None, 1.0, 0.37])
def test_matches_naive_semantics(shape_name: str, lora_weight: float, bias: float | None) -> None:
    shape = SHAPES[shape_name]
    plain = make_transformer(shape)
    flexi = copy.deepcopy(plain)
    adapter = attach_flexiact(flexi, rank=RANK, alpha=ALPHA, num_motion_tokens=MOTION)
    randomise(adapter)
    args = inputs(plain, shape)
    with torch.no_grad():
        expected = naive_transformer(plain, adapter, lora_weight, bias)(**args)[0]
        got = flexi(**args, attention_kwargs={"lora_weight": lora_weight, "reweight": bias})[0]
        with adapter.lora_fused_for_inference(lora_weight):
            fused = flexi(**args, attention_kwargs={"reweight": None if bias is None else torch.tensor(bias)})[0]
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4
    assert (fused - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_every_attention_backend_matches_naive_semantics(shape_name: str, backend: str) -> None:
    shape = SHAPES[shape_name]
    plain = make_transformer(shape)
    flexi = copy.deepcopy(plain)
    adapter = attach_flexiact(flexi, rank=RANK, alpha=ALPHA, num_motion_tokens=MOTION)
    randomise(adapter)
    args = inputs(plain, shape)
    with torch.no_grad():
        expected = naive_transformer(plain, adapter, 0.7, 0.37)(**args)[0]
        got = flexi(**args, attention_kwargs={"lora_weight": 0.7, "reweight": torch.tensor(0.37), "attention_backend": backend})[0]
    assert (got - expected).abs().max().item() < 1e-4


def test_bias_and_lora_change_the_output() -> None:
    """Guards the parity test against settings that silently do nothing."""
    shape = SHAPES["two-layer"]
    flexi = make_transformer(shape)
    adapter = attach_flexiact(flexi, rank=RANK, alpha=ALPHA, num_motion_tokens=MOTION)
    randomise(adapter)
    args = inputs(flexi, shape)
    outs = []
    with torch.no_grad():
        for weight, bias in ((0.0, None), (0.7, None), (0.0, 1.0)):
            outs.append(flexi(**args, attention_kwargs={"lora_weight": weight, "reweight": bias})[0])
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    assert (outs[0] - outs[2]).abs().max() > 1e-3


def test_unfuse_restores_weights_bit_for_bit() -> None:
    flexi = make_transformer(SHAPES["two-layer"])
    before = {k: v.clone() for k, v in flexi.state_dict().items()}
    adapter = attach_flexiact(flexi, rank=RANK, alpha=ALPHA, num_motion_tokens=MOTION)
    randomise(adapter)
    with adapter.lora_fused_for_inference(0.7):
        assert not torch.equal(flexi.transformer_blocks[0].attn1.to_q.weight, before["transformer_blocks.0.attn1.to_q.weight"])
        adapter.load_refadapter(adapter.refadapter_state_dict())  # unfolds, loads, refolds at the same weight
    after = flexi.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_attach_twice_is_an_error() -> None:
    flexi = make_transformer(SHAPES["two-layer"])
    attach_flexiact(flexi, rank=RANK, alpha=ALPHA, num_motion_tokens=MOTION)
    with pytest.raises(RuntimeError, match="already attached"):
        attach_flexiact(flexi)


class ShapeRecorder(TorchDispatchMode):
    """Records every op and the largest tensor any op produced."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_reweighting_never_materialises_an_l_by_l_tensor() -> None:
    """Forward and backward with the bias on: only the fused SDPA kernel, nothing of L x L elements."""
    length, heads = 2048, 2
    q, k, v = (torch.randn(1, heads, length, 16, requires_grad=True) for _ in range(3))
    with ShapeRecorder() as rec:
        out = biased_attention(q, k, v, bias=0.8, rows=slice(452, None), columns=slice(226, 452))
        out.sum().backward()
    assert any("scaled_dot_product" in op for op in rec.ops)
    assert not any(op.split(".")[1] in {"bmm", "baddbmm", "mm", "softmax", "_softmax"} for op in rec.ops)
    assert rec.largest < length * length


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("bias", [0.61, -2.0, torch.tensor(1.3)])
def test_biased_attention_matches_dense_bias(backend: str, bias) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 8, generator=g) for _ in range(3))
    logits = q @ k.transpose(-1, -2) / 8**0.5
    logits[:, :, 20:, 5:12] += float(bias)
    expected = logits.softmax(-1) @ v
    got = biased_attention(q, k, v, bias=bias, rows=slice(20, None), columns=slice(5, 12), backend=backend)
    assert (got - expected).abs().max() < 1e-5


def test_unknown_attention_backend_is_named() -> None:
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match="padded, flex, lse_merge"):
        biased_attention(q, q, q, bias=1.0, rows=slice(2, None), columns=slice(0, 1), backend="dense")


# ---- checkpoints -------------------------------------------------------------------------------------------

@pytest.fixture()
def adapter() -> FlexiActAdapter:
    a = attach_flexiact(make_transformer(SHAPES["two-layer"]), rank=RANK, alpha=ALPHA, num_motion_tokens=MOTION)
    randomise(a)
    return a


def test_published_pt_round_trip(adapter: FlexiActAdapter, tmp_path) -> None:
    action, ref = adapter.action_state_dict(), adapter.refadapter_state_dict()
    assert set(action) == {f"transformer_blocks.{i}.attn1.processor.motion_inversion_tokens" for i in range(2)}
    assert "transformer_blocks.1.attn1.processor.lora_proj.up.weight" in ref
    torch.save({k: v.clone() for k, v in action.items()}, tmp_path / "action.pt")
    torch.save({k: v.clone() for k, v in ref.items()}, tmp_path / "ref.pt")
    save_file({k: v.contiguous() for k, v in action.items()}, tmp_path / "action.safetensors")
    other = attach_flexiact(make_transformer(SHAPES["two-layer"]), rank=RANK, alpha=ALPHA, num_motion_tokens=MOTION)
    other.load_action(tmp_path / "action.pt")
    other.load_refadapter(tmp_path / "ref.pt")
    for k, v in {**action, **ref}.items():
        assert torch.equal({**other.action_state_dict(), **other.refadapter_state_dict()}[k], v)
    other.reset_action()
    other.load_action(str(tmp_path / "action.safetensors"))
    assert all(torch.equal(other.action_state_dict()[k], v) for k, v in action.items())


def _unchanged(adapter: FlexiActAdapter, before: dict) -> bool:
    now = {**adapter.action_state_dict(), **adapter.refadapter_state_dict()}
    return all(torch.equal(now[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda s: s.pop(next(iter(s))), "missing key"),
        (lambda s: s.__setitem__("transformer_blocks.9.attn1.processor.extra", torch.zeros(1)), "unknown key"),
        (lambda s: s.__setitem__(next(iter(s)), torch.zeros(1, 3, 3)), "wrong shape"),
        (lambda s: s.__setitem__(next(iter(s)), torch.full(s[next(iter(s))].shape, float("nan"))), "NaN"),
    ],
)
def test_malformed_action_is_rejected_and_nothing_loads(adapter: FlexiActAdapter, corrupt, message: str) -> None:
    before = {k: v.clone() for k, v in {**adapter.action_state_dict(), **adapter.refadapter_state_dict()}.items()}
    state = {k: torch.ones_like(v) for k, v in adapter.action_state_dict().items()}
    corrupt(state)
    with pytest.raises(CheckpointError, match=message):
        adapter.load_action(state)
    assert _unchanged(adapter, before)


def test_refadapter_file_given_as_action_is_rejected(adapter: FlexiActAdapter, tmp_path) -> None:
    torch.save(dict(adapter.refadapter_state_dict()), tmp_path / "ref.pt")
    with pytest.raises(CheckpointError, match="missing key"):
        adapter.load_action(tmp_path / "ref.pt")


class Payload:
    """A pickled object that is not a dict of tensors (and must never be unpickled)."""

    def __reduce__(self):
        return (print, ("this must not run",))


@pytest.mark.parametrize("content", ["not a dict", "arbitrary object", "text file", "list of tensors", "empty"])
def test_unsafe_or_foreign_files_are_rejected(adapter: FlexiActAdapter, tmp_path, content: str) -> None:
    path = tmp_path / "bad.pt"
    if content == "not a dict":
        torch.save(torch.zeros(3), path)
    elif content == "arbitrary object":
        path.write_bytes(pickle.dumps(Payload()))
    elif content == "text file":
        path.write_text("hello, I am a caption")
    elif content == "list of tensors":
        torch.save([torch.zeros(1)], path)
    else:
        path.write_bytes(b"")
    before = {k: v.clone() for k, v in adapter.action_state_dict().items()}
    with pytest.raises(CheckpointError):
        adapter.load_action(path)
    assert _unchanged(adapter, before)
    with pytest.raises(CheckpointError, match="no such file"):
        adapter.load_action(tmp_path / "absent.pt")
