"""Prompt learning on the miniature SD with a real (short) optimisation, and the learned-vector cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backbones.sd as sd
import backbones.sd_prompt as sp
from backbones import load_backbone
from harness.errors import ConfigError
from harness.features import FeatureCache, extract_sequence_features
from harness.features import prompts as prompt_cache

# a few steps at a higher rate than the released 0.01 so that a random tiny UNet moves within seconds
FAST = sp.PromptLearningSettings(steps=40, lr=0.3, ensemble_size=2)
#: side of the attention grid (the latent grid) of the test frames
GRID = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> sd.StableDiffusionBackbone:
    backbone = load_backbone("sd-tiny", device="cpu")
    assert isinstance(backbone, sd.StableDiffusionBackbone)
    return backbone


@pytest.fixture(scope="module")
def size(tiny: sd.StableDiffusionBackbone) -> tuple[int, int]:
    """Frames whose latent grid is GRID x GRID, whatever the tiny model's VAE downsampling."""
    return GRID * tiny.vae_scale, GRID * tiny.vae_scale


@pytest.fixture(scope="module")
def scene(size: tuple[int, int]) -> tuple[torch.Tensor, np.ndarray]:
    """A frame with two flat-coloured rectangles on noise, and its labels (object 1 left, 2 right)."""
    generator = torch.Generator().manual_seed(0)
    frame = torch.rand((1, 3, *size), generator=generator) * 2 - 1
    labels = np.zeros(size, dtype=np.uint8)
    cell = size[0] // GRID
    left = (slice(2 * cell, 14 * cell), slice(1 * cell, 8 * cell))
    right = (slice(3 * cell, 12 * cell), slice(9 * cell, 15 * cell))
    for channel, (rows, cols), colour in ((1, left, (0.9, 0.2, -0.5)), (2, right, (-0.8, 0.7, 0.1))):
        frame[:, :, rows, cols] = torch.tensor(colour).reshape(1, 3, 1, 1)
        labels[rows, cols] = channel
    return frame, labels


def target_of(tiny: sd.StableDiffusionBackbone, labels: np.ndarray, channel: int) -> torch.Tensor:
    grid = sp.prompt_grid_size(tiny, labels.shape)
    assert grid == (GRID, GRID)
    return prompt_cache.object_targets(labels, 3, grid)[channel]


@pytest.fixture(scope="module")
def learned(tiny, scene) -> dict[int, sp.LearnedPrompt]:
    frame, labels = scene
    return {
        channel: sp.learn_prompt_vector(
            tiny,
            frame,
            target_of(tiny, labels, channel),
            FAST,
            generator=sp.prompt_generator(0, "s", channel, "cpu"),
        )
        for channel in (1, 2)
    }


# -- the cross-attention probe -------------------------------------------------------------------------


def test_probe_reads_the_attention_probability(tiny: sd.StableDiffusionBackbone) -> None:
    """A context whose every position is the same vector gets uniform attention: exactly 1/L everywhere."""
    length = tiny.tokenizer.model_max_length
    context = torch.randn(1, 1, sp.vector_width(tiny), generator=torch.Generator().manual_seed(2))
    x_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    attention = sp.attention_on_token(tiny, x_t, 100, context.expand(1, length, -1))
    assert attention.shape == (2, 16, 16)
    torch.testing.assert_close(attention, torch.full_like(attention, 1 / length))
    # a real prompt gives an uneven map whose values are probabilities
    real = sp.attention_on_token(tiny, x_t, 100, sp.prompt_embedding(tiny))
    assert float(real.min()) > 0 and float(real.max()) < 1 and float(real.std()) > 0


def test_probe_does_not_change_the_features(tiny: sd.StableDiffusionBackbone, scene) -> None:
    frame, _ = scene
    settings = {
        "timestep": 100,
        "layers": list(tiny.layers()),
        "ensemble_size": 2,
        "seed": 0,
        "sequence": "s",
    }
    plain = tiny.extract(frame, frame_indices=[0], **settings)
    module = sp.probe_attention_module(tiny.unet)
    probe = sp._CrossAttentionProbe(module, sp.TOKEN_POSITION, stop=False)
    handle = module.register_forward_hook(probe, with_kwargs=True)
    try:
        probed = tiny.extract(frame, frame_indices=[0], **settings)
    finally:
        handle.remove()
    assert probe.probabilities is not None
    for layer in tiny.layers():
        assert torch.equal(plain[layer], probed[layer])


def cross_attentions_in_call_order(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """attn2 modules in the order a forward pass calls them: down blocks, middle block, up blocks."""
    ordered: list[torch.nn.Module] = []
    for part in ("down_blocks", "mid_block", "up_blocks"):
        for name, module in getattr(unet, part).named_modules():
            if name.endswith("attn2"):
                ordered.append(module)
    return ordered


def test_call_order_helper_matches_a_real_forward(tiny: sd.StableDiffusionBackbone) -> None:
    calls: list[torch.nn.Module] = []
    modules = [m for name, m in tiny.unet.named_modules() if name.endswith("attn2")]
    handles = [m.register_forward_pre_hook(lambda module, args: calls.append(module)) for m in modules]
    try:
        tiny.unet_features(
            torch.zeros(1, 4, 8, 8), 10, [f"up_ft{len(tiny.unet.up_blocks) - 1}"]
        )  # the whole decoder
    finally:
        for handle in handles:
            handle.remove()
    assert calls == cross_attentions_in_call_order(tiny.unet)
    # the probe is the first of the finest block's cross-attentions
    finest = len(tiny.unet.up_blocks[-1].attentions)
    assert calls.index(sp.probe_attention_module(tiny.unet)) == len(calls) - finest


def test_sd21_probe_is_the_14th_cross_attention_and_star_is_one_token(shared_dir: Path) -> None:
    reference = shared_dir / "reference" / "sd21"
    if not reference.is_dir():
        pytest.skip(f"{reference} is not present")
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    unet_config = json.loads((reference / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    ordered = cross_attentions_in_call_order(unet)
    assert ordered.index(sp.probe_attention_module(unet)) == 13  # released: cross_att_cnt == 13
    assert sp.probe_attention_module(unet).to_k.in_features == 1024  # the learned vector's width
    tokenizer = CLIPTokenizer.from_pretrained(reference / "tokenizer")
    ids = tokenizer("*", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert ids[0] == 49406 and ids[2] == 49407  # <|startoftext|> * <|endoftext|>
    assert len(tokenizer("*", add_special_tokens=False).input_ids) == 1


# -- learning --------------------------------------------------------------------------------------------


def test_the_loss_falls(learned: dict[int, sp.LearnedPrompt]) -> None:
    for channel, result in learned.items():
        assert len(result.losses) == FAST.steps
        first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
        assert last < 0.95 * first, (channel, first, last)


def test_the_learned_vector_moves_the_attention_toward_the_mask(tiny, scene, learned) -> None:
    """On held-out noise, the map of the learned vector fits its mask better than the initial vector's."""
    frame, labels = scene
    initial = torch.full((sp.vector_width(tiny),), FAST.init_value)
    for channel, result in learned.items():
        target = target_of(tiny, labels, channel)

        def attention(vector: torch.Tensor) -> torch.Tensor:
            generator = torch.Generator().manual_seed(1234)  # not the learning's noise
            return sp.cross_attention_map(tiny, frame, vector, ensemble_size=4, generator=generator)

        before, after = attention(initial), attention(result.vector)
        assert F.binary_cross_entropy(after, target) < 0.95 * F.binary_cross_entropy(before, target)
        inside = target > 0
        contrast_before = before[inside].mean() - before[~inside].mean()
        contrast_after = after[inside].mean() - after[~inside].mean()
        assert contrast_after > contrast_before + 0.01, channel


def test_learning_is_seeded(tiny, scene) -> None:
    frame, labels = scene
    settings = sp.PromptLearningSettings(steps=3, lr=0.1, ensemble_size=1)
    target = target_of(tiny, labels, 1)

    def learn(seed: int) -> sp.LearnedPrompt:
        return sp.learn_prompt_vector(
            tiny, frame, target, settings, generator=sp.prompt_generator(seed, "s", 1, "cpu")
        )

    first, again, other = learn(0), learn(0), learn(1)
    assert torch.equal(first.vector, again.vector) and first.losses == again.losses
    assert not torch.equal(first.vector, other.vector)


def test_features_differ_per_object(tiny, scene, learned) -> None:
    frame, _ = scene
    settings = {
        "timestep": 100,
        "layers": [tiny.default_layer],
        "ensemble_size": 2,
        "seed": 0,
        "sequence": "s",
        "frame_indices": [0],
    }
    plain = tiny.extract(frame, **settings)[tiny.default_layer]
    per_object = {
        c: sp.PromptedStableDiffusion(tiny, r.vector).extract(frame, **settings)[tiny.default_layer]
        for c, r in learned.items()
    }
    assert per_object[1].shape == plain.shape
    assert (per_object[1] - per_object[2]).abs().max() > 1e-3
    assert (per_object[1] - plain).abs().max() > 1e-3
    # same vector, same noise: the same features
    assert torch.equal(
        per_object[1],
        sp.PromptedStableDiffusion(tiny, learned[1].vector).extract(frame, **settings)[tiny.default_layer],
    )


def test_prompted_features_are_cached_under_their_vector(tiny, size, scene, learned, tmp_path: Path) -> None:
    frame, _ = scene
    cache = FeatureCache(tmp_path / "features")
    common = {
        "sequence": "s",
        "frame_ids": ["f0"],
        "load_frames": lambda indices: frame,
        "input_size": size,
        "timestep": 100,
        "layers": [tiny.default_layer],
        "ensemble_size": 1,
        "progress": False,
        "cache": cache,
    }
    prompted = {c: sp.PromptedStableDiffusion(tiny, r.vector) for c, r in learned.items()}
    assert prompted[1].identity() != prompted[2].identity() != tiny.identity()
    first = {c: extract_sequence_features(b, **common)[tiny.default_layer] for c, b in prompted.items()}
    assert cache.stats.misses == 2 and cache.stats.hits == 0
    again = {c: extract_sequence_features(b, **common)[tiny.default_layer] for c, b in prompted.items()}
    assert cache.stats.hits == 2
    for channel in first:
        assert torch.equal(first[channel], again[channel])
    assert not torch.equal(first[1], first[2])


# -- the vector cache --------------------------------------------------------------------------------


def test_sequence_prompts_are_cached(tiny, scene, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame, labels = scene
    settings = sp.PromptLearningSettings(steps=2, lr=0.1, ensemble_size=1)
    cache = prompt_cache.PromptCache(tmp_path / "prompts")
    common = {
        "sequence": "s",
        "first_frame": frame,
        "first_frame_id": "frame0-content",
        "first_labels": labels,
        "object_ids": [3, 7],
        "settings": settings,
        "seed": 0,
    }
    cold = prompt_cache.learn_sequence_prompts(tiny, cache=cache, **common)
    assert [(p.channel, p.object_id, p.cached) for p in cold] == [(1, 3, False), (2, 7, False)]
    assert len(list((tmp_path / "prompts").glob("*.prompt.safetensors"))) == 2

    def no_learning(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached vector was learned again")

    monkeypatch.setattr(prompt_cache, "learn_prompt_vector", no_learning)
    warm = prompt_cache.learn_sequence_prompts(tiny, cache=cache, **common)
    assert [p.cached for p in warm] == [True, True] and cache.stats.hits == 2
    for before, after in zip(cold, warm, strict=True):
        assert torch.equal(before.learned.vector, after.learned.vector)
        assert before.learned.losses == after.learned.losses
    monkeypatch.undo()
    # another mask, seed or setting is another key
    moved = labels.copy()
    moved[moved == 1] = 0
    moved[20:28, 2:10] = 1
    for change in (
        {"first_labels": moved},
        {"seed": 1},
        {"settings": sp.PromptLearningSettings(steps=3, ensemble_size=1)},
    ):
        again = prompt_cache.learn_sequence_prompts(tiny, cache=cache, **{**common, **change})
        assert not again[0].cached, change


def test_a_corrupt_vector_entry_is_a_miss(tmp_path: Path) -> None:
    cache = prompt_cache.PromptCache(tmp_path)
    key = prompt_cache.PromptKey("b", "s", 1, "f", "m", (32, 32), 0, "{}")
    cache.put(key, sp.LearnedPrompt(torch.arange(4.0), (0.5, 0.25)))
    found = cache.get(key)
    assert found is not None and torch.equal(found.vector, torch.arange(4.0)) and found.losses == (0.5, 0.25)
    cache.path_for(key).write_bytes(b"not a safetensors file")
    assert cache.get(key) is None and cache.stats.corrupt == 1
    assert not cache.path_for(key).exists()


# -- clear errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [{"steps": 0}, {"lr": 0.0}, {"ensemble_size": 0}, {"timestep": 1.5}, {"prompt": " "}, {"steps": True}],
)
def test_bad_settings_are_config_errors(settings: dict) -> None:
    with pytest.raises(ConfigError):
        sp.PromptLearningSettings(**settings)


def test_bad_inputs_are_config_errors(tiny, scene) -> None:
    frame, labels = scene
    target = target_of(tiny, labels, 1)
    generator = torch.Generator()
    with pytest.raises(ConfigError, match="attention grid"):
        sp.learn_prompt_vector(tiny, frame, target[:4], FAST, generator=generator)
    with pytest.raises(ConfigError, match="one token"):
        sp.prompt_embedding(tiny, "two words")
    with pytest.raises(ConfigError, match="Stable Diffusion"):
        sp.learn_prompt_vector(
            load_backbone("random-conv", device="cpu"), frame, target, FAST, generator=generator
        )
    with pytest.raises(ConfigError, match="shape"):
        sp.conditioning_with_vector(sp.prompt_embedding(tiny), torch.zeros(5))


def test_condition_backbone(tiny, learned) -> None:
    assert sp.condition_backbone(tiny, None) is tiny and sp.condition_backbone(tiny, {}) is tiny
    conditioned = sp.condition_backbone(tiny, {"prompt_vector": learned[1].vector})
    assert isinstance(conditioned, sp.PromptedStableDiffusion)
    assert conditioned.identity() == sp.PromptedStableDiffusion(tiny, learned[1].vector).identity()
    assert conditioned.layers() == tiny.layers() and conditioned.default_layer == tiny.default_layer
    with pytest.raises(ConfigError, match="condition keys"):
        sp.condition_backbone(tiny, {"vector": learned[1].vector})
    with pytest.raises(ConfigError, match="Stable Diffusion"):
        sp.condition_backbone(
            load_backbone("random-conv", device="cpu"), {"prompt_vector": learned[1].vector}
        )


def test_prompt_artifacts(tmp_path: Path) -> None:
    prompts = [
        prompt_cache.ObjectPrompt(1, 4, sp.LearnedPrompt(torch.arange(3.0), (0.7, 0.6)), cached=False),
        prompt_cache.ObjectPrompt(2, 9, sp.LearnedPrompt(-torch.arange(3.0), (0.5,)), cached=True),
    ]
    written = prompt_cache.write_prompt_artifacts(prompts, tmp_path / "s")
    assert [path.name for path in written] == ["4.safetensors", "9.safetensors"]
    from safetensors import safe_open

    with safe_open(str(written[1]), framework="pt") as handle:
        assert torch.equal(handle.get_tensor("vector"), -torch.arange(3.0))
        assert json.loads(handle.metadata()["losses"]) == [0.5]


def test_vectors_outlive_a_feature_cache_clear(tmp_path: Path) -> None:
    """They sit beside the feature entries, which `harness cache clear` / eviction manage without them:
    vectors are a few KiB each and cost a hundred UNet passes (delete ``<cache>/prompts`` to drop them)."""
    features = FeatureCache(tmp_path)
    features.prepare()  # as a run does before anything is written
    vectors = prompt_cache.PromptCache.beside_features(features.root)
    key = prompt_cache.PromptKey("b", "s", 1, "f", "m", (32, 32), 0, "{}")
    vectors.put(key, sp.LearnedPrompt(torch.arange(4.0), (0.5,)))
    assert vectors.root == tmp_path / "prompts"
    features.prepare()  # the next run: the folder is still a cache
    assert features.info().entries == 0
    features.clear()
    found = vectors.get(key)
    assert found is not None and torch.equal(found.vector, torch.arange(4.0))
