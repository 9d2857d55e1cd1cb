"""Compiled blocks and the step cache on the tiny model: same frames, no recompiles, no caching inside the window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from flexiact_backend.generation import FlexiActGenerator


def random_action(generator: FlexiActGenerator, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in generator.adapter.action_state_dict().items()}


def test_step_cache_acts_only_after_the_reweight_window(tiny_generator: FlexiActGenerator, target_image) -> None:
    attention_calls: list[int] = [0]
    per_step: list[int] = []

    def count(module, args, kwargs):
        attention_calls[0] += 1

    def step_done(step: int, total: int, elapsed: float) -> None:
        per_step.append(attention_calls[0])
        attention_calls[0] = 0

    hook = tiny_generator.pipe.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(count, with_kwargs=True)
    try:
        cached = tiny_generator.generate(target_image, "a dog runs", steps=20, step_cache=True, progress=step_done)
    finally:
        hook.remove()
    full = tiny_generator.generate(target_image, "a dog runs", steps=20)
    window = [i for i, r in enumerate(cached.reweights) if r is not None]
    assert window and cached.cached_steps, "the schedule has a window and the cache served some steps"
    assert min(cached.cached_steps) > max(window)
    # Observed independently: the steps where the first block's attention never ran are exactly the cached ones.
    assert [i for i, n in enumerate(per_step) if n == 0] == cached.cached_steps
    assert full.cached_steps == []
    assert not np.array_equal(cached.frames, full.frames), "a cache that served steps changes the numbers"


def test_step_cache_with_the_bias_off_everywhere(tiny_generator: FlexiActGenerator, target_image) -> None:
    """No window at all: the cache may act from step 1 on (step 0 computes, as TaylorSeer needs one sample)."""
    result = tiny_generator.generate(target_image, "a dog runs", steps=8, reweight_scale=None, step_cache=True)
    assert result.cached_steps and 0 not in result.cached_steps


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_never_recompile(tiny_model_dir, tiny_generator: FlexiActGenerator, target_image) -> None:
    """Compiled at load (warm-up included); then new bias values, actions, LoRA weights and prompts reuse the graphs."""
    torch._dynamo.reset()
    counters.clear()
    compiled = FlexiActGenerator.from_pretrained(tiny_model_dir, device="cpu", compile=True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0, "the warm-up compiled the blocks"
    runs = [
        dict(prompt="a dog runs"),
        dict(prompt="a cat jumps and turns", action=random_action(compiled, 1), reweight_scale=2.5, lora_weight=1.0),
        dict(prompt="a figure waves", action=random_action(compiled, 2), reweight_scale=0.5, transition=0.9, lora_weight=0.3),
    ]
    g = torch.Generator().manual_seed(4)
    refadapter = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in compiled.adapter.refadapter_state_dict().items()}
    compiled.use_refadapter(refadapter)  # so the LoRA weights really fold
    tiny_generator.use_refadapter(refadapter)
    try:
        for run in runs:
            fast = compiled.generate(target_image, steps=4, **run)
            eager = tiny_generator.generate(target_image, steps=4, **run)
            assert fast.settings.lora_weight == run.get("lora_weight", 0.7)
            assert np.abs(fast.frames.astype(int) - eager.frames.astype(int)).max() <= 3
    finally:
        tiny_generator.use_refadapter(None)
    assert counters["stats"]["unique_graphs"] == graphs, "a setting change recompiled a block"
