"""Generation on the tiny model: schedule, determinism, actions, progress, cancel, mp4 output."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

from flexiact_backend.errors import Cancelled
from flexiact_backend.generation import FlexiActGenerator
from flexiact_backend.media import probe_video
from flexiact_backend.model import reweight_schedule
from flexiact_backend.model.schedule import BadTransition


def rule(t: float, timesteps: list[int], scale: float, h: float) -> float | None:
    """FLEXIACT.md's rule (S above t*, a half cosine down to t=700, off at and below 700), independent of the code."""
    t_star = next(x for x in timesteps if x < 1000 * h)
    if t <= 700:
        return None
    if t > t_star:
        return scale
    return 0.5 * math.cos(math.pi * (t - 1000 * h) / (700 - 1000 * h)) + 0.5


@pytest.mark.parametrize("steps", [50, 30, 10])
@pytest.mark.parametrize("scale, transition", [(1.0, 0.7), (1.0, 0.8), (2.5, 0.8), (1.0, 0.9), (1.0, 0.95), (1.0, 1.0)])
def test_schedule_in_force_at_each_step(tiny_generator: FlexiActGenerator, steps: int, scale: float, transition: float) -> None:
    timesteps = tiny_generator.scheduled_timesteps(steps)
    assert len(timesteps) == steps and timesteps == sorted(timesteps, reverse=True)
    expected = [rule(t, timesteps, scale, transition) for t in timesteps]
    assert reweight_schedule(timesteps, scale, transition) == pytest.approx(expected)
    assert expected[0] == pytest.approx(scale, rel=1e-4) and expected[-1] is None  # h=1: t*=999, cos(~0)
    assert all(r is None for t, r in zip(timesteps, expected) if t <= 700)


@pytest.mark.parametrize("transition", [0.5, 0.69, 1.01])
def test_undefined_transitions_are_refused(tiny_generator: FlexiActGenerator, target_image, transition: float) -> None:
    """Below 0.7 the formula's two rules overlap (full bias above 1000h, none at or below 700); above 1 nothing is high."""
    with pytest.raises(BadTransition, match=r"outside 0.7-1: .* Give a value from 0.7 to 1 \(default 0.8\)"):
        reweight_schedule(tiny_generator.scheduled_timesteps(50), 1.0, transition)
    with pytest.raises(BadTransition, match="outside 0.7-1"):
        tiny_generator.generate(target_image, "a dog runs", steps=2, transition=transition)


def no_hooks_left(generator: FlexiActGenerator) -> bool:
    """No reweighting or cache hook survives a generation (diffusers keeps them in `_diffusers_hook` registries)."""
    return not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in generator.pipe.transformer.modules())


def test_bias_reaches_the_attention_at_each_step(tiny_generator: FlexiActGenerator, target_image) -> None:
    """The bias each `attn1` receives in its call's keyword arguments is the schedule's value for that step."""
    seen: list[float | None] = []

    def record(module, args, kwargs):
        bias = kwargs.get("reweight")
        seen.append(None if bias is None else float(bias))

    hook = tiny_generator.pipe.transformer.transformer_blocks[1].attn1.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = tiny_generator.generate(target_image, "a dog runs", steps=10)
    finally:
        hook.remove()
    timesteps = tiny_generator.scheduled_timesteps(10)
    assert seen == pytest.approx([rule(t, timesteps, 1.0, 0.8) for t in timesteps])
    assert result.reweights == pytest.approx(seen)
    assert no_hooks_left(tiny_generator)


def test_same_seed_same_frames_and_shape(tiny_generator: FlexiActGenerator, target_image) -> None:
    a = tiny_generator.generate(target_image, "a dog runs", steps=6, seed=7)
    b = tiny_generator.generate(target_image, "a dog runs", steps=6, seed=7)
    c = tiny_generator.generate(target_image, "a dog runs", steps=6, seed=8)
    info = tiny_generator.info
    assert a.frames.shape == (info.frames, info.height, info.width, 3) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)


def test_action_tokens_change_the_video(tiny_generator: FlexiActGenerator, target_image) -> None:
    g = torch.Generator().manual_seed(3)
    action = {k: torch.randn(v.shape, generator=g) * 3 for k, v in tiny_generator.adapter.action_state_dict().items()}
    zero = tiny_generator.generate(target_image, "a dog runs", steps=6)
    moved = tiny_generator.generate(target_image, "a dog runs", steps=6, action=action)
    again = tiny_generator.generate(target_image, "a dog runs", steps=6)
    assert not np.array_equal(zero.frames, moved.frames)
    assert np.array_equal(zero.frames, again.frames), "a generation without an action must not inherit the last one"


def test_weights_restored_after_generation(tiny_generator: FlexiActGenerator, target_image) -> None:
    g = torch.Generator().manual_seed(5)
    tiny_generator.use_refadapter({k: torch.randn(v.shape, generator=g) for k, v in
                                   tiny_generator.adapter.refadapter_state_dict().items()})
    tiny_generator.adapter.reset_action()  # what a generation without an action leaves
    try:
        before = {k: v.clone() for k, v in tiny_generator.pipe.transformer.state_dict().items()}
        result = tiny_generator.generate(target_image, "a dog runs", steps=3, lora_weight=0.7)
        assert result.settings.lora_weight == 0.7 and result.settings.refadapter == "given state dict"  # it was folded
        after = tiny_generator.pipe.transformer.state_dict()
        assert [k for k, v in before.items() if not torch.equal(after[k], v)] == []
        assert not tiny_generator.adapter.lora_fused
    finally:
        tiny_generator.use_refadapter(None)


def test_progress_once_per_step(tiny_generator: FlexiActGenerator, target_image) -> None:
    calls = []
    tiny_generator.generate(target_image, "a cat", steps=7, progress=lambda step, total, elapsed: calls.append((step, total, elapsed)))
    assert [c[:2] for c in calls] == [(i, 7) for i in range(1, 8)]
    assert all(b[2] >= a[2] for a, b in zip(calls, calls[1:]))


def test_cancel_stops_within_one_step(tiny_generator: FlexiActGenerator, target_image) -> None:
    steps_run = []
    with pytest.raises(Cancelled):
        tiny_generator.generate(target_image, "a cat", steps=20, progress=lambda s, t, e: steps_run.append(s), cancel=lambda: len(steps_run) >= 3)
    assert steps_run == [1, 2, 3]
    assert no_hooks_left(tiny_generator) and not tiny_generator.adapter.lora_fused


@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_fit_mapping_and_mp4(tiny_generator: FlexiActGenerator, target_image, tmp_path, fit: str) -> None:
    result = tiny_generator.generate(target_image, "a cat", steps=2, fit=fit)
    assert result.fit.to_dict()
    for fps in (24.0, 30000 / 1001):
        path = result.write_mp4(tmp_path / f"out-{fit}-{fps:.3f}.mp4", fps=fps)
        info = probe_video(path)
        duration = tiny_generator.info.frames / tiny_generator.info.fps
        assert info.frames == round(duration * fps)
        assert info.fps == pytest.approx(fps, rel=1e-3)
        assert (info.width, info.height) == (tiny_generator.info.width, tiny_generator.info.height)


#: scheduler/scheduler_config.json of THUDM/CogVideoX-5b-I2V as published: it names the DDIM scheduler.
REAL_SCHEDULER_CONFIG = {
    "_class_name": "CogVideoXDDIMScheduler",
    "_diffusers_version": "0.31.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 1.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}


def test_folder_naming_ddim_generates_with_dpm(tiny_model_dir, tiny_generator: FlexiActGenerator, target_image, tmp_path) -> None:
    """The real model's folder names CogVideoXDDIMScheduler; generation must still sample with the DPM scheduler."""
    folder = tmp_path / "real-scheduler"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(REAL_SCHEDULER_CONFIG))
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "CogVideoXDDIMScheduler"]  # as the hub's model_index.json names it
    (folder / "model_index.json").write_text(json.dumps(index))
    generator = FlexiActGenerator.from_pretrained(folder, device="cpu")
    scheduler = generator.pipe.scheduler
    assert type(scheduler) is CogVideoXDPMScheduler
    for key in ("timestep_spacing", "prediction_type", "rescale_betas_zero_snr", "snr_shift_scale", "beta_schedule"):
        assert scheduler.config[key] == REAL_SCHEDULER_CONFIG[key], key

    visited: list[int] = []
    hook = generator.pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: visited.append(int(kw["timestep"][0])), with_kwargs=True)
    try:
        result = generator.generate(target_image, "a dog runs", steps=10, seed=5)
    finally:
        hook.remove()
    dpm = CogVideoXDPMScheduler.from_config(REAL_SCHEDULER_CONFIG)
    dpm.set_timesteps(10)
    expected = [int(t) for t in dpm.timesteps]
    assert visited == expected
    assert result.reweights == pytest.approx([rule(t, expected, 1.0, 0.8) for t in expected])
    # Same weights and a DPM-named folder give the same frames; the DDIM the folder names would not.
    assert np.array_equal(result.frames, tiny_generator.generate(target_image, "a dog runs", steps=10, seed=5).frames)
    generator.pipe.scheduler = CogVideoXDDIMScheduler.from_config(REAL_SCHEDULER_CONFIG)
    ddim = generator.generate(target_image, "a dog runs", steps=10, seed=5)
    assert not np.array_equal(result.frames, ddim.frames)


def test_reweight_null_is_the_released_script(tiny_generator: FlexiActGenerator, target_image) -> None:
    """`reweight_scale=None` never biases attention: the authors' released script, plain softmax at every step,
    the same as a bias of 0. The paper's default bias changes what the transformer predicts at high timesteps."""
    g = torch.Generator().manual_seed(4)
    action = {k: torch.randn(v.shape, generator=g) * 3 for k, v in tiny_generator.adapter.action_state_dict().items()}
    transformer = tiny_generator.pipe.transformer

    def first_prediction(scale: float | None) -> tuple[torch.Tensor, list[float | None], list[float | None]]:
        outputs, held = [], []
        def record(module, args, kwargs) -> None:  # the bias the attention receives at each step
            held.append(None if kwargs.get("reweight") is None else float(kwargs["reweight"]))

        hooks = [transformer.transformer_blocks[0].attn1.register_forward_pre_hook(record, with_kwargs=True),
                 transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].detach().clone()))]
        try:
            result = tiny_generator.generate(target_image, "a dog runs", steps=3, action=action, reweight_scale=scale)
        finally:
            for h in hooks:
                h.remove()
        return outputs[0], held, result.reweights

    released, held, reweights = first_prediction(None)
    assert held == [None] * 3 and reweights == [None] * 3
    zero_bias, _, reweights = first_prediction(0.0)
    assert reweights[0] == 0.0 and torch.allclose(zero_bias, released, atol=1e-5)
    paper, held, reweights = first_prediction(1.0)
    assert held[0] == reweights[0] == 1.0
    assert (paper - released).abs().max() > 100 * (zero_bias - released).abs().max() + 1e-4


def test_takes_batched_equal_single_runs_of_their_seeds(tiny_generator: FlexiActGenerator, target_image) -> None:
    """Take i of a batch is the video `generate(seed=seeds[i])` makes; one at a time gives the same takes."""
    calls: list[tuple[int, int]] = []
    takes = tiny_generator.generate_takes(target_image, "a dog runs", seeds=[5, 6, 7], steps=4,
                                          progress=lambda done, total, elapsed: calls.append((done, total)))
    assert [t.settings.seed for t in takes] == [5, 6, 7] and {t.batch for t in takes} == {3}
    assert calls == [(3 * i, 12) for i in range(1, 5)]
    one_by_one = tiny_generator.generate_takes(target_image, "a dog runs", seeds=[5, 6, 7], steps=4, max_batch=1)
    assert {t.batch for t in one_by_one} == {1}
    for take, alone, seed in zip(takes, one_by_one, (5, 6, 7)):
        single = tiny_generator.generate(target_image, "a dog runs", seed=seed, steps=4).frames
        assert np.array_equal(alone.frames, single)
        # batched matmuls may round differently from batch-1 ones: at most one grey level apart
        assert np.abs(take.frames.astype(int) - single.astype(int)).max() <= 1
    assert not np.array_equal(takes[0].frames, takes[1].frames)
    assert not np.array_equal(takes[1].frames, takes[2].frames)
