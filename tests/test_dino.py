"""Tests of the DINO backbones: the official checkpoint layouts, strict loading and its errors, features
through ``extract`` (shapes, determinism, position-embedding interpolation, DINO's normalisation), the
deterministic time step / ensemble rules, the offline weights lookup and full runs of the tiny variants.

Nothing is downloaded: full-size networks are built on the meta device, checkpoints are written by the
tests in the official key layout, and the downloader is replaced where a lookup would use it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import backbones.dino as dino
import backbones.download
from backbones import describe_backbone, load_backbone
from backbones.dino import DinoBackbone
from backbones.vit import (
    VIT_B8,
    VIT_S8,
    VIT_S8_TINY,
    XCIT_S12_P8,
    XCIT_S12_P8_TINY,
    Attention,
    ViTConfig,
    XCiTConfig,
    build_network,
)
from backbones.weights import WEIGHTS_DIR_ENV, file_sha256
from harness.config import RunConfig
from harness.errors import ConfigError, HarnessError, WeightsNotFoundError
from harness.frames import network_input_size
from harness.pipeline import run

TINY = ["dino-vits8-tiny", "dino-vitb8-tiny", "dino-xcits8-tiny"]


# -- the official layouts, written out from the reference code (not from backbones.vit) ----------------


def official_vit_layout(dim: int, depth: int, patch: int = 8, img: int = 224) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of dino's VisionTransformer(num_classes=0), vision_transformer.py:49-159."""
    layout: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, (img // patch) ** 2 + 1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    for i in range(depth):
        block = {
            "norm1.weight": (dim,),
            "norm1.bias": (dim,),
            "attn.qkv.weight": (3 * dim, dim),
            "attn.qkv.bias": (3 * dim,),  # qkv_bias=True in vit_small / vit_base
            "attn.proj.weight": (dim, dim),
            "attn.proj.bias": (dim,),
            "norm2.weight": (dim,),
            "norm2.bias": (dim,),
            "mlp.fc1.weight": (4 * dim, dim),
            "mlp.fc1.bias": (4 * dim,),
            "mlp.fc2.weight": (dim, 4 * dim),
            "mlp.fc2.bias": (dim,),
        }
        layout |= {f"blocks.{i}.{key}": shape for key, shape in block.items()}
    return layout


def _batch_norm(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.weight": (channels,),
        f"{prefix}.bias": (channels,),
        f"{prefix}.running_mean": (channels,),
        f"{prefix}.running_var": (channels,),
        f"{prefix}.num_batches_tracked": (),
    }


def official_xcit_layout(dim: int, depth: int, heads: int, hidden: int = 32) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of xcit's XCiT(patch_size=8, num_classes=0), xcit.py:20-357 (2 CA blocks)."""
    layout: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
        "pos_embeder.token_projection.weight": (dim, 2 * hidden, 1, 1),
        "pos_embeder.token_projection.bias": (dim,),
    }
    widths = [3, dim // 4, dim // 2, dim]
    for stage, index in enumerate((0, 2, 4)):  # proj = conv-bn, GELU, conv-bn, GELU, conv-bn
        layout[f"patch_embed.proj.{index}.0.weight"] = (widths[stage + 1], widths[stage], 3, 3)
        layout |= _batch_norm(f"patch_embed.proj.{index}.1", widths[stage + 1])
    mlp = {
        "mlp.fc1.weight": (4 * dim, dim),
        "mlp.fc1.bias": (4 * dim,),
        "mlp.fc2.weight": (dim, 4 * dim),
        "mlp.fc2.bias": (dim,),
    }
    attn = {
        "attn.qkv.weight": (3 * dim, dim),
        "attn.qkv.bias": (3 * dim,),
        "attn.proj.weight": (dim, dim),
        "attn.proj.bias": (dim,),
    }
    for i in range(depth):
        block = {f"norm{n}.{p}": (dim,) for n in (1, 2, 3) for p in ("weight", "bias")}
        block |= {f"gamma{n}": (dim,) for n in (1, 2, 3)} | attn | mlp
        block["attn.temperature"] = (heads, 1, 1)
        block |= {f"local_mp.conv{n}.weight": (dim, 1, 3, 3) for n in (1, 2)}
        block |= {f"local_mp.conv{n}.bias": (dim,) for n in (1, 2)}
        block |= _batch_norm("local_mp.bn", dim)
        layout |= {f"blocks.{i}.{key}": shape for key, shape in block.items()}
    for i in range(2):
        block = {f"norm{n}.{p}": (dim,) for n in (1, 2) for p in ("weight", "bias")}
        block |= {f"gamma{n}": (dim,) for n in (1, 2)} | attn | mlp
        layout |= {f"cls_attn_blocks.{i}.{key}": shape for key, shape in block.items()}
    return layout


def _layout_of(config: ViTConfig | XCiTConfig) -> dict[str, tuple[int, ...]]:
    if isinstance(config, ViTConfig):
        return official_vit_layout(config.embed_dim, config.depth, config.patch_size, config.img_size)
    return official_xcit_layout(config.embed_dim, config.depth, config.num_heads, config.pos_hidden_dim)


def _built_layout(config: ViTConfig | XCiTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        net = build_network(config)
    return {key: tuple(value.shape) for key, value in net.state_dict().items()}


@pytest.mark.parametrize(
    ("config", "parameters"),
    # published sizes: ViT-S/8 21M, ViT-B/8 85M, XCiT-S12/8 26M (dino README); exact counts from the layout
    [(VIT_S8, 21_670_272), (VIT_B8, 85_807_872), (XCIT_S12_P8, 25_828_032)],
    ids=["vits8", "vitb8", "xcits8"],
)
def test_full_size_networks_have_the_official_checkpoint_layout(
    config: ViTConfig | XCiTConfig, parameters: int
) -> None:
    expected = _layout_of(config)
    assert _built_layout(config) == expected
    counted = sum(math.prod(shape) for key, shape in expected.items() if "running_" not in key and shape)
    assert counted == parameters


def _official_file(config: ViTConfig | XCiTConfig, path: Path, seed: int = 7) -> dict[str, torch.Tensor]:
    """A checkpoint in the official layout with random values, built from the layout table alone."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in _layout_of(config).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(100, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[key] = 0.2 * torch.randn(shape, generator=generator)
    torch.save(state, path)
    return state


@pytest.mark.parametrize(
    ("name", "config"), [("dino-vits8-tiny", VIT_S8_TINY), ("dino-xcits8-tiny", XCIT_S12_P8_TINY)]
)
def test_official_layout_file_loads_strictly_and_is_used(
    tmp_path: Path, name: str, config: ViTConfig | XCiTConfig
) -> None:
    path = tmp_path / "checkpoint.pth"
    state = _official_file(config, path)
    backbone = load_backbone(name, weights=str(path), device="cpu").load()  # type: ignore[attr-defined]
    loaded = backbone.net.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[key].cpu(), state[key].to(loaded[key].dtype)) for key in state)
    assert f"sha256={file_sha256(path)}" in backbone.identity()


@pytest.mark.parametrize("config", [VIT_S8_TINY, XCIT_S12_P8_TINY], ids=["vit", "xcit"])
def test_a_checkpoint_without_batch_norm_counters_still_loads(tmp_path: Path, config) -> None:
    path = tmp_path / "no-counters.pth"
    state = _official_file(config, path)
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    DinoBackbone(config, weights=path, name="t").load()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("missing", r"1 missing: blocks\.1\.mlp\.fc2\.bias"),
        ("extra", r"1 unexpected: head\.weight"),
        ("shape", r"1 wrong shape: pos_embed \(1, 50, 32\) != \(1, 65, 32\)"),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_rejected_naming_the_file(
    tmp_path: Path, change: str, expected: str
) -> None:
    path = tmp_path / f"bad-{change}.pth"
    state = _official_file(VIT_S8_TINY, path)
    if change == "missing":
        del state["blocks.1.mlp.fc2.bias"]
    elif change == "extra":
        state["head.weight"] = torch.zeros(10, 32)
    else:
        state["pos_embed"] = torch.zeros(1, 50, 32)
    torch.save(state, path)
    with pytest.raises(HarnessError, match=expected) as raised:
        load_backbone("dino-vits8-tiny", weights=str(path), device="cpu").load()  # type: ignore[attr-defined]
    assert str(path) in str(raised.value)


def test_an_unreadable_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "truncated.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(HarnessError, match="truncated.pth"):
        DinoBackbone(VIT_S8_TINY, weights=path, name="t").load()


# -- features ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.rand((3, 3, 48, 80), generator=generator) * 2 - 1


def _extract(backbone: DinoBackbone, frames: torch.Tensor, layers: list, **kw) -> dict:
    args = {"timestep": 0, "ensemble_size": 1, "seed": 0, "sequence": "s"} | kw
    return backbone.extract(frames, layers=layers, frame_indices=list(range(len(frames))), **args)


@pytest.mark.parametrize("name", TINY)
def test_tiny_features_are_patch_grids_and_deterministic(name: str, frames: torch.Tensor) -> None:
    backbone = load_backbone(name, device="cpu")
    channels = backbone.layers()[0].channels
    last = backbone.default_layer
    first = _extract(backbone, frames, [0, last])  # type: ignore[arg-type]
    assert set(first) == {0, last}
    assert all(f.shape == (3, channels, 6, 10) and f.dtype == torch.float32 for f in first.values())
    assert not torch.allclose(first[0], first[last])
    # no noise: seed and sequence change nothing, and a frame's features do not depend on its batch
    again = _extract(backbone, frames, [last], seed=5, sequence="other")  # type: ignore[arg-type]
    assert torch.equal(again[last], first[last])
    alone = _extract(backbone, frames[1:2], [last])  # type: ignore[arg-type]
    torch.testing.assert_close(alone[last][0], first[last][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dino-vits8-tiny", "dino-xcits8-tiny"])
def test_frames_are_normalised_with_dinos_mean_and_std(name: str, frames: torch.Tensor) -> None:
    backbone = load_backbone(name, device="cpu")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # eval_video_segmentation.py:244
    std = torch.tensor([0.228, 0.224, 0.225]).view(1, 3, 1, 1)
    rgb01 = (frames + 1) / 2
    direct = backbone.net.block_features((rgb01 - mean) / std, [1])  # type: ignore[attr-defined]
    through_extract = _extract(backbone, frames, [1])  # type: ignore[arg-type]
    torch.testing.assert_close(through_extract[1], direct[1])
    unnormalised = backbone.net.block_features(frames, [1])  # type: ignore[attr-defined]
    assert not torch.allclose(through_extract[1], unnormalised[1], atol=1e-3)


def test_default_layer_is_the_final_normed_last_block_as_dino_evaluates() -> None:
    """get_intermediate_layers(n=1) = norm(last block); other layers also pass the final norm."""
    backbone = load_backbone("dino-vits8-tiny", device="cpu")
    net = backbone.net  # type: ignore[attr-defined]
    x = torch.randn(1, 3, 32, 40)
    tokens = net.prepare_tokens(x)
    outputs = []
    for block in net.blocks:
        tokens = block(tokens)
        outputs.append(net.norm(tokens)[:, 1:].reshape(1, 4, 5, -1).permute(0, 3, 1, 2))
    features = net.block_features(x, list(range(len(net.blocks))))
    assert backbone.default_layer == len(net.blocks) - 1
    for index, expected in enumerate(outputs):
        torch.testing.assert_close(features[index], expected)


def test_position_embedding_is_unchanged_on_the_training_grid_and_keeps_axes_when_resized() -> None:
    net = build_network(VIT_S8_TINY)  # 8x8 training grid
    side = VIT_S8_TINY.grid_size
    with torch.no_grad():
        rows = torch.arange(side, dtype=torch.float32).repeat_interleave(side)  # varies along rows only
        net.pos_embed[0, 1:] = rows[:, None].expand(-1, VIT_S8_TINY.embed_dim)
        net.pos_embed[0, 0] = -5.0
    assert net.interpolate_pos_encoding(side * side, 64, 64) is net.pos_embed
    resized = net.interpolate_pos_encoding(3 * 13, 24, 104).detach()  # a 3x13 grid
    assert resized.shape == (1, 1 + 3 * 13, VIT_S8_TINY.embed_dim)
    assert torch.all(resized[0, 0] == -5.0)  # CLS entry untouched
    grid = resized[0, 1:, 0].reshape(3, 13)
    assert torch.allclose(grid, grid[:, :1].expand(-1, 13), atol=1e-5)  # still constant along a row
    assert grid[0, 0] < grid[1, 0] < grid[2, 0]  # and increasing down the rows


def test_dino_interpolation_uses_the_scale_factor_with_the_0_1_offset() -> None:
    """The sampling positions come from (grid + 0.1) / 8, not from the output size (dino issue #8)."""
    net = build_network(VIT_S8_TINY)
    with torch.no_grad():
        net.pos_embed.normal_(generator=torch.Generator().manual_seed(1))
    resized = net.interpolate_pos_encoding(5 * 7, 40, 56).detach()[0, 1:]
    grid = net.pos_embed.detach()[0, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(5, 7), mode="bicubic").permute(0, 2, 3, 1).reshape(35, -1)
    by_scale = F.interpolate(grid, scale_factor=(5.1 / 8, 7.1 / 8), mode="bicubic")
    by_scale = by_scale.permute(0, 2, 3, 1).reshape(35, -1)
    torch.testing.assert_close(resized, by_scale)
    assert not torch.allclose(resized, by_size, atol=1e-4)


def test_attention_equals_the_explicit_softmax_formula() -> None:
    """DINO computes softmax(q k^T * d**-0.5) v explicitly (vision_transformer.py:80-92)."""
    torch.manual_seed(0)
    attention = Attention(dim=24, num_heads=3, qkv_bias=True)
    x = torch.randn(2, 11, 24)
    q, k, v = attention.qkv(x).reshape(2, 11, 3, 3, 8).permute(2, 0, 3, 1, 4)
    weights = ((q @ k.transpose(-2, -1)) * 8**-0.5).softmax(dim=-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, 11, 24))
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)


def test_xcit_class_token_path_runs() -> None:
    net = build_network(XCIT_S12_P8_TINY).eval()
    assert net(torch.randn(2, 3, 32, 48)).shape == (2, XCIT_S12_P8_TINY.embed_dim)


def test_frames_must_be_a_multiple_of_the_patch_size() -> None:
    backbone = load_backbone("dino-vits8-tiny", device="cpu")
    with pytest.raises(ConfigError, match="patch size 8"):
        _extract(backbone, torch.zeros(1, 3, 44, 64), [0])  # type: ignore[arg-type]


def test_input_size_matches_dinos_read_frame_on_davis() -> None:
    """DINO resizes 854x480 frames to 832x480 (short side 480, long side floored to 64)."""
    backbone = load_backbone("dino-vitb8", device="cpu")  # nothing is read until features are needed
    assert network_input_size(854, 480, 480, backbone.size_multiple) == (480, 832)
    assert network_input_size(480, 854, 480, backbone.size_multiple) == (832, 480)


# -- time steps, ensembles, layers -------------------------------------------------------------------------


def test_time_step_and_ensemble_other_than_neutral_are_errors_naming_the_backbone(frames) -> None:
    backbone = load_backbone("dino-vits8-tiny", device="cpu")
    assert backbone.check_timestep(0) == 0 and backbone.default_timestep == 0
    with pytest.raises(ConfigError, match=r"'dino-vits8-tiny'.*time step must be 0, got 30"):
        _extract(backbone, frames, [0], timestep=30)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"'dino-vits8-tiny'.*ensemble size must be 1, got 2"):
        _extract(backbone, frames, [0], ensemble_size=2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "depth", "channels"),
    [
        ("dino-vits8", 12, 384),
        ("dino-vitb8", 12, 768),
        ("dino-xcits8", 12, 384),
        ("dino-vits8-tiny", 3, 32),
        ("dino-vitb8-tiny", 4, 48),
        ("dino-xcits8-tiny", 3, 32),
    ],
)
def test_layer_table(name: str, depth: int, channels: int) -> None:
    info = describe_backbone(name)
    assert info["default_timestep"] == 0 and info["default_layer"] == depth - 1
    assert info["layers"] == [{"layer": i, "channels": channels, "stride": 8} for i in range(depth)]
    backbone = load_backbone(name, device="cpu")
    assert backbone.describe()["layers"] == info["layers"]
    assert backbone.resolve_layer(str(depth - 1)) == depth - 1
    with pytest.raises(ConfigError, match=f"no layer {depth}"):
        backbone.resolve_layer(depth)


def test_describing_a_published_backbone_builds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("describe must not build the backbone")

    monkeypatch.setattr(dino.DinoBackbone, "__init__", must_not_build)
    assert "dino_vitbase8_pretrain.pth" in str(describe_backbone("dino-vitb8")["weights"])


def test_identity_changes_with_architecture_and_seed() -> None:
    identities = {load_backbone(name, device="cpu").identity() for name in TINY}
    identities.add(load_backbone("dino-vits8-tiny", device="cpu", init_seed=1).identity())
    assert len(identities) == 4


# -- weights lookup ----------------------------------------------------------------------------------------


def test_offline_lookup_raises_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Path]] = []

    def offline(url: str, dest: Path, **kwargs: object) -> Path:
        calls.append((url, Path(dest)))
        raise HarnessError(f"cannot download {url}: network is unreachable")

    monkeypatch.setattr(backbones.download, "download_file", offline)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    backbone = load_backbone("dino-vitb8", device="cpu")
    url = "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"
    expected_path = tmp_path / "weights" / "dino_vitbase8_pretrain.pth"
    with pytest.raises(WeightsNotFoundError) as info:
        backbone.load()  # type: ignore[attr-defined]
    message = str(info.value)
    assert str(expected_path) in message and url in message and WEIGHTS_DIR_ENV in message
    assert calls == [(url, expected_path)]


def test_a_weights_file_in_the_weights_dir_is_used_without_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a present file must not be downloaded")

    monkeypatch.setattr(backbones.download, "download_file", must_not_download)
    monkeypatch.setitem(
        dino.PUBLISHED_WEIGHTS, VIT_S8_TINY.preset, dino.DinoWeights("tiny.pth", "http://x/y")
    )
    _official_file(VIT_S8_TINY, tmp_path / "tiny.pth")
    backbone = load_backbone("dino-vits8-tiny", device="cpu", weights_dir=str(tmp_path)).load()  # type: ignore
    assert backbone.weights_path == tmp_path / "tiny.pth"
    assert "sha256=" in backbone.identity()


def test_explicit_missing_weights_file_is_not_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("explicit weights must not trigger a download")

    monkeypatch.setattr(backbones.download, "download_file", must_not_download)
    with pytest.raises(WeightsNotFoundError, match="nowhere.pth"):
        load_backbone("dino-xcits8", weights=str(tmp_path / "nowhere.pth"), device="cpu").load()  # type: ignore


def test_unknown_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown option.*'dino-vits8'"):
        load_backbone("dino-vits8", device="cpu", timestep=3)


# -- full runs ---------------------------------------------------------------------------------------------


def _run_config(root: Path, out: Path, **overrides: object) -> RunConfig:
    base = {
        "dataset.root": str(root),
        "dataset.sequences": ["synth-reenter"],
        "input.short_side": 64,
        "cache.dir": str(out / "cache"),
        "output_dir": str(out / "run"),
        "progress": False,
    }
    return RunConfig().with_overrides(base | overrides)


@pytest.mark.parametrize("name", TINY)
def test_tiny_variants_run_end_to_end_with_defaults(synth_root: Path, tmp_path: Path, name: str) -> None:
    result = run(_run_config(synth_root, tmp_path, **{"backbone.name": name}))
    assert result.timestep == 0 and result.layer == load_backbone(name, device="cpu").default_layer
    assert result.metrics is not None and 0.0 <= result.metrics["J&F-Mean"] <= 1.0


def test_a_run_with_a_noise_time_step_fails_before_any_work(synth_root: Path, tmp_path: Path) -> None:
    config = _run_config(
        synth_root, tmp_path, **{"backbone.name": "dino-vits8-tiny", "backbone.timestep": 30}
    )
    with pytest.raises(ConfigError, match="'dino-vits8-tiny'"):
        run(config)
    assert not (tmp_path / "run" / "predictions").exists()


# -- published results ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "jf"), [("dino-vitb8", 71.4), ("dino-vits8", 69.9)])
def test_published_dino_rows_use_dinos_own_propagation_settings(name: str, jf: float) -> None:
    from harness.published import published_system

    system = published_system(name)
    assert system is not None and system.jf == jf and system.weights == (name,)
    assert system.overrides["backbone.name"] == name
    # eval_video_segmentation.py: exp(sim / 0.1) at :129, argparse defaults at :260-263
    settings = {key.removeprefix("method."): value for key, value in system.overrides.items()}
    assert settings["temperature"] == 0.1 and settings["topk"] == 5
    assert settings["radius"] == 12 and settings["n_last_frames"] == 7
    assert describe_backbone(name)["default_layer"] == 11  # the last block, as get_intermediate_layers(n=1)
    config = RunConfig().with_overrides(system.overrides)
    assert config.method.name == "labelprop" and config.backbone.name == name
    assert config.input.short_side == 480


def test_baselines_study_runs_dino_with_exactly_its_published_settings() -> None:
    from harness.published import PUBLISHED
    from harness.study.spec import load_study_spec

    spec = load_study_spec(Path(__file__).resolve().parents[1] / "studies" / "baselines.yaml")
    assert (spec.dataset.root, spec.dataset.split) == ("data/DAVIS", "val")
    assert spec.target_trials() == 2
    trials = [spec.trial_overrides(entry) for entry in spec.enqueue]
    assert trials == [PUBLISHED["dino-vitb8"].overrides, PUBLISHED["dino-vits8"].overrides]


def test_cli_lists_the_dino_backbones_without_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from harness.cli import main

    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path / "empty"))
    assert main(["backbones", "list"]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if line.startswith("dino-xcits8 "))
    assert f"no ({tmp_path / 'empty' / 'dino_xcit_small_12_p8_pretrain.pth'})" in row
    assert main(["backbones", "list", "--layers", "dino-vitb8"]) == 0
    table = capsys.readouterr().out
    assert "dino-vitb8: default t 0, default layer 11" in table
    assert any(line.split() == ["11", "768", "8"] for line in table.splitlines())
    assert not (tmp_path / "empty").exists()  # nothing downloaded


def test_leaderboard_shows_dinos_published_number_beside_a_baselines_trial() -> None:
    """A trial of studies/baselines.yaml, logged with all its settings, is matched to its published row."""
    from harness.published import PUBLISHED
    from harness.study.spec import load_study_spec
    from harness.tracking.leaderboard import published_system_of
    from harness.tracking.names import flatten_settings

    spec = load_study_spec(Path(__file__).resolve().parents[1] / "studies" / "baselines.yaml")
    found = []
    for entry in spec.enqueue:
        on_davis_val = {"dataset.root": "data/DAVIS", "dataset.split": "val"}
        config = RunConfig().with_overrides(on_davis_val | spec.trial_overrides(entry))
        system = published_system_of(flatten_settings(config.to_dict()), {}, PUBLISHED)
        found.append((system.name, system.jf) if system else None)
    assert found == [("dino-vitb8", 71.4), ("dino-vits8", 69.9)]
    # the paper's propagation settings on the same backbone are not DINO's published evaluation
    paper = RunConfig().with_overrides({"dataset.split": "val", "backbone.name": "dino-vitb8"})
    assert published_system_of(flatten_settings(paper.to_dict()), {}, PUBLISHED) is None


@pytest.mark.parametrize("changed", [{"method.filter": "oracle"}, {"method.per_object": True}])
def test_a_filtered_or_per_object_run_is_not_shown_beside_a_published_number(changed: dict) -> None:
    """The published rows are plain joint propagation: the oracle or the per-object mode is another system."""
    from harness.published import PUBLISHED
    from harness.tracking.leaderboard import published_system_of
    from harness.tracking.names import flatten_settings

    for name in ("dino-vitb8", "paper-adm", "dift-sd21"):
        overrides = {"dataset.root": "data/DAVIS", "dataset.split": "val"} | PUBLISHED[name].overrides
        plain = RunConfig().with_overrides(overrides)
        assert published_system_of(flatten_settings(plain.to_dict()), {}, PUBLISHED) is PUBLISHED[name]
        other = RunConfig().with_overrides(overrides | changed)
        assert published_system_of(flatten_settings(other.to_dict()), {}, PUBLISHED) is None
