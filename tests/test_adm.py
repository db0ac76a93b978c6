"""Tests of the ADM backbone: architecture against the official checkpoint layout, early stopping,
weight loading, noise/ensemble semantics of extract(), and the offline weights lookup.

Everything runs on the tiny preset (random weights) or on the meta device, so nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import backbones.adm as adm
import backbones.download
from backbones import load_backbone
from backbones.adm import ADMBackbone, random_state_dict
from backbones.adm_unet import (
    ADM_256_UNCOND,
    ADM_TINY,
    ADMConfig,
    ADMUNet,
    AttentionBlock,
    GroupNorm32,
    timestep_embedding,
)
from backbones.base import frame_generator
from backbones.weights import WEIGHTS_DIR_ENV, file_sha256, weights_dir
from harness.errors import ConfigError, HarnessError, WeightsNotFoundError

# Decoder layers of the official model (reference README): layer -> (channels, stride)
OFFICIAL_LAYERS = {
    0: (1024, 32), 1: (1024, 32), 2: (1024, 16), 3: (1024, 16), 4: (1024, 16), 5: (1024, 8),
    6: (512, 8), 7: (512, 8), 8: (512, 4), 9: (512, 4), 10: (512, 4), 11: (512, 2),
    12: (256, 2), 13: (256, 2), 14: (256, 1), 15: (256, 1), 16: (256, 1), 17: (256, 1),
}  # fmt: skip
OFFICIAL_PARAMETERS = 552_814_086
OFFICIAL_TENSORS = 566
# A few shapes from the checkpoint's key table, so some layout check runs without ../shared
OFFICIAL_SPOT_SHAPES = {
    "time_embed.0.weight": (1024, 256),
    "time_embed.2.weight": (1024, 1024),
    "input_blocks.0.0.weight": (256, 3, 3, 3),
    "input_blocks.1.0.emb_layers.1.weight": (512, 1024),
    "input_blocks.7.0.skip_connection.weight": (512, 256, 1, 1),
    "input_blocks.13.1.qkv.weight": (3072, 1024, 1),
    "middle_block.1.proj_out.weight": (1024, 1024, 1),
    "output_blocks.0.0.skip_connection.weight": (1024, 2048, 1, 1),
    "output_blocks.5.0.skip_connection.weight": (1024, 1536, 1, 1),
    "output_blocks.11.0.skip_connection.weight": (512, 768, 1, 1),
    "output_blocks.17.0.skip_connection.weight": (256, 512, 1, 1),
    "out.2.weight": (6, 256, 3, 3),
}
SIZE = 64  # tiny-model test frames are SIZE x SIZE (a multiple of the tiny size_multiple 32)


def _meta_net(config: ADMConfig) -> ADMUNet:
    with torch.device("meta"):
        return ADMUNet(config)


@pytest.fixture(scope="module")
def tiny() -> ADMBackbone:
    return load_backbone("adm-tiny", device="cpu").load()  # type: ignore[return-value]


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    return torch.rand((3, 3, SIZE, SIZE), generator=generator) * 2 - 1


def _alphabar(t: int) -> float:
    """Reference schedule computed independently with numpy in float64."""
    return float(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))[t])


# -- architecture ------------------------------------------------------------------------------------


def test_official_state_dict_matches_checkpoint_table(shared_dir: Path) -> None:
    table = shared_dir / "reference" / "adm256_uncond_state_dict.tsv"
    if not table.is_file():
        pytest.skip(f"{table} is not present")
    rows = [line.split("\t") for line in table.read_text().splitlines()[1:] if line.strip()]
    expected = {key: tuple(int(n) for n in shape.split("x")) for key, shape, _ in rows}
    assert {dtype for _, _, dtype in rows} == {"float32"}
    state = _meta_net(ADM_256_UNCOND).state_dict()
    actual = {key: tuple(value.shape) for key, value in state.items()}
    assert set(actual) - set(expected) == set()
    assert set(expected) - set(actual) == set()
    assert actual == expected
    assert sum(math.prod(shape) for shape in expected.values()) == OFFICIAL_PARAMETERS


def test_official_architecture_spot_checks() -> None:
    net = _meta_net(ADM_256_UNCOND)
    state = net.state_dict()
    assert len(state) == OFFICIAL_TENSORS
    assert sum(p.numel() for p in net.parameters()) == OFFICIAL_PARAMETERS
    assert len(net.output_blocks) == 18
    for key, shape in OFFICIAL_SPOT_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    assert ADM_256_UNCOND.size_multiple == 32


def test_official_layer_table_matches_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    backbone = load_backbone("adm", device="meta")  # no weights needed to describe the layers
    table = {key: (info.channels, info.stride) for key, info in backbone.layers().items()}
    assert table == OFFICIAL_LAYERS
    assert backbone.default_layer == 6 and backbone.default_timestep == 30
    assert backbone.size_multiple == 32
    description = backbone.describe()
    assert str(tmp_path / adm.OFFICIAL_FILENAME) in str(description["weights"])


@pytest.mark.parametrize("config", [ADM_256_UNCOND, ADM_TINY], ids=lambda c: c.preset)
def test_layer_table_agrees_with_built_network(config: ADMConfig) -> None:
    """The table worked out from the settings and the one recorded while building the modules agree."""
    assert config.output_block_shapes() == _meta_net(config).output_shapes
    assert len(config.output_block_shapes()) == config.num_output_blocks


def test_tiny_features_have_the_advertised_shapes(tiny: ADMBackbone, frames: torch.Tensor) -> None:
    layers = list(tiny.layers())
    features = tiny.unet_features(frames[:1], 10, layers)
    for key, info in tiny.layers().items():
        assert tuple(features[key].shape) == (1, info.channels, SIZE // info.stride, SIZE // info.stride)


def test_non_square_input_works(tiny: ADMBackbone) -> None:
    x = torch.zeros((1, 3, 32, 96))
    out = tiny.net(x, 5)
    assert out.shape == (1, 6, 32, 96)


def test_timestep_embedding_by_hand() -> None:
    # dim 4: frequencies exp(-ln(10000) * [0, 1] / 2) = [1, 0.01]; cos half first
    got = timestep_embedding(torch.tensor([0, 1, 250]), 4)
    expected = torch.tensor(
        [
            [1.0, 1.0, 0.0, 0.0],
            [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)],
            [math.cos(250), math.cos(2.5), math.sin(250), math.sin(2.5)],
        ]
    )
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_attention_uses_legacy_per_head_qkv_layout() -> None:
    """Reference: per head h, rows [h*3d, h*3d+d) are q, the next d are k, the next d are v."""
    channels, head, groups = 32, 16, 8
    block = AttentionBlock(channels, head, groups)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    x = torch.randn((2, channels, 3, 5), generator=generator)

    flat = x.reshape(2, channels, 15)
    normed = F.group_norm(flat, groups, block.norm.weight, block.norm.bias, eps=1e-5)
    qkv = torch.einsum("oc,bct->bot", block.qkv.weight[..., 0], normed) + block.qkv.bias[None, :, None]
    heads = []
    for h in range(channels // head):
        base = h * 3 * head
        q, k, v = (qkv[:, base + i * head : base + (i + 1) * head] for i in range(3))
        attention = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(head), dim=-1)
        heads.append(torch.einsum("bts,bcs->bct", attention, v))
    mixed = torch.cat(heads, dim=1)
    projected = (
        torch.einsum("oc,bct->bot", block.proj_out.weight[..., 0], mixed) + block.proj_out.bias[None, :, None]
    )
    expected = (flat + projected).reshape(x.shape)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_groupnorm32_computes_in_float32() -> None:
    norm = GroupNorm32(2, 4)
    x = (torch.randn((1, 4, 3, 3), generator=torch.Generator().manual_seed(1)) * 100).to(torch.bfloat16)
    with torch.no_grad():
        out = norm(x)
        expected = F.group_norm(x.float(), 2, norm.weight, norm.bias).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_bad_config_and_bad_input_size_raise() -> None:
    with pytest.raises(ConfigError, match="groups"):
        ADMConfig(preset="odd", model_channels=48)
    net = ADMUNet(ADM_TINY)
    with pytest.raises(ConfigError, match="multiple of 32"):
        net(torch.zeros((1, 3, 30, 32)), 1)


# -- early stopping ---------------------------------------------------------------------------------


def test_decoder_features_equal_full_forward_activations(tiny: ADMBackbone, frames: torch.Tensor) -> None:
    net = tiny.net
    captured: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_hook(lambda _m, _i, out, index=index: captured.__setitem__(index, out))
        for index, block in enumerate(net.output_blocks)
    ]
    try:
        with torch.no_grad():
            net(frames[:2], 40)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        early = net.decoder_features(frames[:2], 40, [1, 3])
    assert set(early) == {1, 3}
    for index in (1, 3):
        torch.testing.assert_close(early[index], captured[index], atol=1e-6, rtol=0)


def test_decoder_features_stop_at_the_deepest_requested_layer(
    tiny: ADMBackbone, frames: torch.Tensor
) -> None:
    net = tiny.net
    calls: list[str] = []
    modules = {f"output_blocks.{i}": block for i, block in enumerate(net.output_blocks)} | {"out": net.out}
    handles = [
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
        for name, module in modules.items()
    ]
    try:
        with torch.no_grad():
            net.decoder_features(frames[:1], 40, [2, 0])
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["output_blocks.0", "output_blocks.1", "output_blocks.2"]


def test_decoder_features_rejects_unknown_layers(tiny: ADMBackbone, frames: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="0..11"):
        tiny.net.decoder_features(frames[:1], 1, [12])


@pytest.mark.slow
def test_full_forward_matches_diffusers_unet2d() -> None:
    """diffusers' UNet2DModel, configured as an ADM, is an independent reference for the whole network.

    Only the parameter renaming (written here) is shared knowledge; the qkv split follows the legacy
    per-head layout checked separately above.
    """
    diffusers = pytest.importorskip("diffusers")
    config = ADM_TINY
    ours = ADMUNet(config)
    ours.load_state_dict(random_state_dict(config, seed=3))
    ours.eval()
    reference = diffusers.UNet2DModel(
        sample_size=SIZE,
        in_channels=3,
        out_channels=config.out_channels,
        block_out_channels=tuple(m * config.model_channels for m in config.channel_mult),
        layers_per_block=config.num_res_blocks,
        down_block_types=tuple(
            "AttnDownBlock2D" if 2**level in config.attention_rates else "ResnetDownsampleBlock2D"
            for level in range(len(config.channel_mult))
        ),
        up_block_types=tuple(
            "AttnUpBlock2D" if 2**level in config.attention_rates else "ResnetUpsampleBlock2D"
            for level in reversed(range(len(config.channel_mult)))
        ),
        downsample_type="resnet",
        upsample_type="resnet",
        attention_head_dim=config.num_head_channels,
        resnet_time_scale_shift="scale_shift",
        flip_sin_to_cos=True,
        freq_shift=0,
        norm_num_groups=config.norm_groups,
        attn_norm_num_groups=config.norm_groups,
    ).eval()
    reference.load_state_dict(_to_diffusers(ours, config), strict=True)
    x = torch.randn((2, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(4))
    t = torch.tensor([7, 500])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), reference(x, t).sample, atol=2e-4, rtol=1e-4)


def _to_diffusers(net: ADMUNet, config: ADMConfig) -> dict[str, torch.Tensor]:
    """Rename our parameters to diffusers' UNet2DModel names (resnet up/down, scale-shift variant)."""
    renames = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
               "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
               "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
               "middle_block.2": "mid_block.resnets.1"}  # fmt: skip
    per_level = config.num_res_blocks + 1
    levels = len(config.channel_mult)
    for level in range(levels):
        for j in range(config.num_res_blocks):
            block = f"input_blocks.{1 + level * per_level + j}"
            renames[f"{block}.0"] = f"down_blocks.{level}.resnets.{j}"
            renames[f"{block}.1"] = f"down_blocks.{level}.attentions.{j}"
        if level < levels - 1:
            renames[f"input_blocks.{1 + level * per_level + config.num_res_blocks}.0"] = (
                f"down_blocks.{level}.downsamplers.0"
            )
    for up in range(levels):
        for i in range(per_level):
            block = net.output_blocks[up * per_level + i]
            prefix = f"output_blocks.{up * per_level + i}"
            renames[f"{prefix}.0"] = f"up_blocks.{up}.resnets.{i}"
            for position, module in enumerate(block):
                if isinstance(module, AttentionBlock):
                    renames[f"{prefix}.{position}"] = f"up_blocks.{up}.attentions.{i}"
                elif position > 0:
                    renames[f"{prefix}.{position}"] = f"up_blocks.{up}.upsamplers.0"
    inner = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
             "norm": "group_norm", "proj_out": "to_out.0"}  # fmt: skip
    converted: dict[str, torch.Tensor] = {}
    for key, value in net.state_dict().items():
        module_path, param = key.rsplit(".", 1)
        outer = max((p for p in renames if module_path == p or module_path.startswith(p + ".")), key=len)
        rest = module_path[len(outer) + 1 :]
        target = renames[outer]
        if rest == "qkv":
            channels = value.shape[0] // 3
            heads = channels // config.num_head_channels
            split = value.reshape(heads, 3, config.num_head_channels, *value.shape[1:])
            for index, name in enumerate(("to_q", "to_k", "to_v")):
                part = split[:, index].reshape(channels, *value.shape[1:])
                converted[f"{target}.{name}.{param}"] = part[..., 0] if part.ndim == 3 else part
            continue
        if rest == "proj_out" and value.ndim == 3:
            value = value[..., 0]
        name = f"{target}.{inner[rest]}" if rest else target
        converted[f"{name}.{param}"] = value
    return converted


# -- weights --------------------------------------------------------------------------------------


def test_random_state_dict_is_seeded_and_leaves_global_rng_alone() -> None:
    before = torch.get_rng_state()
    first = random_state_dict(ADM_TINY, seed=9)
    assert torch.equal(torch.get_rng_state(), before)
    second = random_state_dict(ADM_TINY, seed=9)
    other = random_state_dict(ADM_TINY, seed=10)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not torch.equal(first["out.2.weight"], other["out.2.weight"])


def test_checkpoint_file_loads_strictly(tmp_path: Path, frames: torch.Tensor) -> None:
    state = random_state_dict(ADM_TINY, seed=5)
    path = tmp_path / "tiny.pt"
    torch.save(state, path)
    loaded = load_backbone("adm-tiny", weights=str(path), device="cpu")
    assert isinstance(loaded, ADMBackbone)
    net_state = loaded.net.state_dict()
    assert set(net_state) == set(state)
    assert all(torch.equal(net_state[key], state[key]) for key in state)
    same_seed = ADMBackbone(ADM_TINY, init_seed=5, name="adm-tiny")
    torch.testing.assert_close(
        loaded.unet_features(frames[:1], 20, [2])[2],
        same_seed.unet_features(frames[:1], 20, [2])[2],
        atol=0,
        rtol=0,
    )
    assert str(path) in str(loaded.describe()["weights"])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda s: s.pop("output_blocks.2.1.qkv.weight"), "missing: output_blocks.2.1.qkv.weight"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), "unexpected: extra.weight"),
        (lambda s: s.__setitem__("out.2.bias", torch.zeros(3)), "wrong shape: out.2.bias"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_mismatching_checkpoint_fails_with_the_key(
    tmp_path: Path, damage: Callable[[dict[str, torch.Tensor]], object], message: str
) -> None:
    state = random_state_dict(ADM_TINY, seed=0)
    damage(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(HarnessError, match=message) as info:
        load_backbone("adm-tiny", weights=str(path), device="cpu").load()  # type: ignore[attr-defined]
    assert str(path) in str(info.value)


def test_unreadable_checkpoint_is_a_harness_error(tmp_path: Path) -> None:
    path = tmp_path / "truncated.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(HarnessError, match="truncated.pt"):
        ADMBackbone(ADM_TINY, weights=path).load()


def test_explicit_missing_weights_file_is_not_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("explicit weights must not trigger a download")

    monkeypatch.setattr(backbones.download, "download_file", must_not_download)
    path = tmp_path / "nowhere.pt"
    with pytest.raises(WeightsNotFoundError, match="nowhere.pt"):
        load_backbone("adm", weights=str(path), device="cpu").load()  # type: ignore[attr-defined]


def test_offline_lookup_raises_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Path]] = []

    def offline(url: str, dest: Path, **kwargs: object) -> Path:
        calls.append((url, Path(dest)))
        raise HarnessError(f"cannot download {url}: network is unreachable")

    monkeypatch.setattr(backbones.download, "download_file", offline)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    backbone = load_backbone("adm", device="cpu")  # building is cheap: nothing is read yet
    expected_path = tmp_path / "weights" / adm.OFFICIAL_FILENAME
    with pytest.raises(WeightsNotFoundError) as info:
        backbone.load()  # type: ignore[attr-defined]
    message = str(info.value)
    assert str(expected_path) in message
    assert adm.OFFICIAL_URL in message
    assert calls == [(adm.OFFICIAL_URL, expected_path)]
    with pytest.raises(WeightsNotFoundError):
        backbone.identity()  # the hash needs the file too


def test_weights_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights_dir() == tmp_path / "home" / ".cache" / "diffvos" / "weights"
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "env"))
    assert weights_dir() == tmp_path / "env"
    assert weights_dir(tmp_path / "cli") == tmp_path / "cli"
    backbone = load_backbone("adm", device="meta", weights_dir=str(tmp_path / "cli"))
    assert backbone.weights_path == tmp_path / "cli" / adm.OFFICIAL_FILENAME  # type: ignore[attr-defined]
    folder = load_backbone("adm", device="meta", weights=str(tmp_path))  # a folder holding the file
    assert folder.weights_path == tmp_path / adm.OFFICIAL_FILENAME  # type: ignore[attr-defined]


def test_file_hash_is_cached_in_a_sidecar_and_refreshed_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"first version")
    assert file_sha256(path) == hashlib.sha256(b"first version").hexdigest()
    sidecar = tmp_path / "weights.pt.sha256"
    record = json.loads(sidecar.read_text())
    assert record["sha256"] == hashlib.sha256(b"first version").hexdigest()
    # the sidecar is trusted while size and mtime match: plant a marker to see it is read, not recomputed
    sidecar.write_text(json.dumps(record | {"sha256": "0" * 64}))
    assert file_sha256(path) == "0" * 64
    path.write_bytes(b"second, longer version")
    assert file_sha256(path) == hashlib.sha256(b"second, longer version").hexdigest()


def test_identity_follows_weights_and_precision(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(random_state_dict(ADM_TINY, seed=1), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    from_file = ADMBackbone(ADM_TINY, weights=path)
    assert digest in from_file.identity()
    random_0 = ADMBackbone(ADM_TINY).identity()
    random_1 = ADMBackbone(ADM_TINY, init_seed=1).identity()
    bf16 = ADMBackbone(ADM_TINY, dtype="bf16").identity()
    assert len({from_file.identity(), random_0, random_1, bf16}) == 4


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="dtype"):
        load_backbone("adm-tiny", device="cpu", dtype="fp8")
    with pytest.raises(ConfigError, match="colour"):
        load_backbone("adm-tiny", device="cpu", colour="blue")
    with pytest.raises(ConfigError, match="channels_last"):
        load_backbone("adm-tiny", device="cpu", channels_last="maybe")


# -- extract ------------------------------------------------------------------------------------------


def _extract(backbone: ADMBackbone, frames: torch.Tensor, **overrides: object) -> dict:
    arguments: dict = {
        "timestep": 50,
        "layers": [2],
        "ensemble_size": 2,
        "seed": 0,
        "sequence": "bear",
        "frame_indices": list(range(frames.shape[0])),
    }
    return backbone.extract(frames, **(arguments | overrides))


def test_extract_is_seeded(tiny: ADMBackbone, frames: torch.Tensor) -> None:
    first = _extract(tiny, frames[:1])[2]
    again = _extract(tiny, frames[:1])[2]
    other_seed = _extract(tiny, frames[:1], seed=1)[2]
    other_frame = _extract(tiny, frames[:1], frame_indices=[5])[2]
    assert first.dtype == torch.float32 and first.device.type == "cpu"
    channels, stride = tiny.layers()[2].channels, tiny.layers()[2].stride
    assert first.shape == (1, channels, SIZE // stride, SIZE // stride)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other_seed, atol=1e-4)
    assert not torch.allclose(first, other_frame, atol=1e-4)


def test_extract_does_not_depend_on_batching(tiny: ADMBackbone, frames: torch.Tensor) -> None:
    together = _extract(tiny, frames, layers=[1, 4], frame_indices=[3, 8, 9])
    for position, index in enumerate([3, 8, 9]):
        alone = _extract(tiny, frames[position : position + 1], layers=[4, "1"], frame_indices=[index])
        for layer in (1, 4):
            torch.testing.assert_close(alone[layer][0], together[layer][position], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("timestep", [0, 30, 999])
def test_ensemble_is_the_mean_over_the_frame_noise_draws(
    tiny: ADMBackbone, frames: torch.Tensor, timestep: int
) -> None:
    ensemble, seed, indices = 3, 11, [4, 7]
    got = _extract(
        tiny, frames[:2], timestep=timestep, ensemble_size=ensemble, seed=seed, frame_indices=indices
    )[2]
    alphabar = _alphabar(timestep)
    if timestep == 0:
        assert alphabar == pytest.approx(1 - 1e-4, abs=1e-15)  # beta_0 alone
    for position, index in enumerate(indices):
        generator = frame_generator(seed, "bear", index, "cpu")
        noise = torch.randn((ensemble, 3, SIZE, SIZE), generator=generator)
        x_t = math.sqrt(alphabar) * frames[position] + math.sqrt(1 - alphabar) * noise
        draws = tiny.unet_features(x_t, timestep, [2])[2]
        torch.testing.assert_close(got[position], draws.mean(dim=0), atol=1e-5, rtol=1e-5)


def test_extract_validates_its_arguments(tiny: ADMBackbone, frames: torch.Tensor) -> None:
    for bad_timestep in (-1, 1000, 2.5, True):
        with pytest.raises(ConfigError):
            _extract(tiny, frames[:1], timestep=bad_timestep)
    for bad_layer in (12, "decoder", -1):
        with pytest.raises(ConfigError, match="layer"):
            _extract(tiny, frames[:1], layers=[bad_layer])
    with pytest.raises(ConfigError, match="multiple of 32"):
        _extract(tiny, torch.zeros((1, 3, SIZE, SIZE - 2)))
    with pytest.raises(ConfigError, match="frame indices"):
        _extract(tiny, frames[:2], frame_indices=[0])
    with pytest.raises(ConfigError, match="ensemble"):
        _extract(tiny, frames[:1], ensemble_size=0)


def test_channels_last_gives_the_same_features(tiny: ADMBackbone, frames: torch.Tensor) -> None:
    channels_last = ADMBackbone(ADM_TINY, name="adm-tiny", channels_last=True)
    torch.testing.assert_close(
        _extract(channels_last, frames[:1])[2], _extract(tiny, frames[:1])[2], atol=1e-5, rtol=1e-5
    )


def test_bf16_autocast_is_close_to_fp32(tiny: ADMBackbone, frames: torch.Tensor) -> None:
    reduced = ADMBackbone(ADM_TINY, name="adm-tiny", dtype="bf16")
    low = _extract(reduced, frames[:1], ensemble_size=1)[2].flatten()
    full = _extract(tiny, frames[:1], ensemble_size=1)[2].flatten()
    assert low.dtype == torch.float32
    assert F.cosine_similarity(low, full, dim=0) > 0.99


# -- published defaults ---------------------------------------------------------------------------


def test_official_adm_declares_the_papers_setting_without_loading_weights(tmp_path: Path) -> None:
    backbone = load_backbone("adm", device="cpu", weights_dir=str(tmp_path))
    # diff-zvos docs/EVALUATION.md:36 (t 30, layer 6) and src/config/eval.yaml:12 (8 noise draws)
    assert (backbone.default_timestep, backbone.default_layer, backbone.default_ensemble_size) == (30, 6, 8)
    assert backbone.resolve_ensemble_size(None) == 8
    assert backbone.resolve_ensemble_size(3) == 3
    assert backbone.describe()["default_ensemble_size"] == 8
    with pytest.raises(ConfigError, match="positive integer"):
        backbone.resolve_ensemble_size(0)
    assert not (tmp_path / adm.OFFICIAL_FILENAME).exists()  # nothing was downloaded or read


def test_tiny_adm_defaults_to_one_draw_and_the_option_overrides_it() -> None:
    assert load_backbone("adm-tiny", device="cpu").default_ensemble_size == 1
    assert load_backbone("adm-tiny", device="cpu", default_ensemble_size=2).resolve_ensemble_size(None) == 2
