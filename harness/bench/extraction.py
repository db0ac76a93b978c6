"""Per-frame feature extraction: the released code's path against ours, for ADM and SD 2.1.

Released path (as the paper's code runs it): the whole UNet in fp32 for every ensemble member, although
only one decoder layer is used; for Stable Diffusion also one VAE encode per ensemble member (the frame is
repeated ensemble-size times before encoding). Our path: the backbones of this project, which stop after
the requested decoder layer, encode a frame once and draw the ensemble from its latent distribution, and
on CUDA run under bf16 autocast with channels-last weights (optionally torch.compile).

Both networks are built with random weights, so no checkpoint is needed: the official ADM 256x256
unconditional architecture, and SD 2.1 from its diffusers configs (``../shared/reference/sd21`` or
``--sd21-config``). Speed does not depend on the weights' values. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no compute), and compared with the
device's measured matrix-product rate. Both paths draw the same noise, so in fp32 their features must
agree; that is checked before anything is timed.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from backbones.adm import ADMBackbone
from backbones.adm_unet import ADM_256_UNCOND, ADM_TINY, ADMConfig, ADMUNet
from backbones.base import frame_generator
from harness.bench.common import (
    SHARED_REFERENCE,
    BenchOptions,
    Timing,
    format_table,
    matmul_rate,
    time_calls,
    time_interleaved,
)
from harness.errors import ConfigError
from harness.methods.labelprop.screening import cpu_has_native_bf16

DAVIS17_VAL_FRAMES = 1999
#: relative difference allowed between two fp32 paths that compute the same features
FP32_AGREEMENT = 1e-4
TARGET_SPEEDUP = 3.0
TARGET_MATMUL_FRACTION = 0.5


@dataclass(frozen=True)
class PathSize:
    """One network input: frame size and ensemble members per frame."""

    height: int
    width: int
    ensemble_size: int


@dataclass(frozen=True)
class ExtractionSettings:
    adm_preset: str
    adm_size: PathSize
    adm_layer: int
    adm_timestep: int
    sd_tiny: bool
    sd_size: PathSize
    sd_timestep: int
    #: the DAVIS-scale setting that a full trial uses, for FLOP counts and projections
    adm_full_size: PathSize
    sd_full_size: PathSize
    repeats: int
    warmup: int
    matmul_size: int


def settings_for(options: BenchOptions) -> tuple[ExtractionSettings, list[str]]:
    full_adm = PathSize(480, 832, 8)
    # SD needs multiples of 64: the harness feeds it 448x832 for a 854x480 frame at short side 480
    full_sd = PathSize(448, 832, 8)
    if options.quick:
        return ExtractionSettings(
            adm_preset="tiny",
            adm_size=PathSize(32, 32, 1),
            adm_layer=2,
            adm_timestep=30,
            sd_tiny=True,
            sd_size=PathSize(32, 32, 2),
            sd_timestep=100,
            adm_full_size=full_adm,
            sd_full_size=full_sd,
            repeats=options.repeats_or(1),
            warmup=0,
            matmul_size=256,
        ), ["--quick: toy ADM and toy SD (same code paths, tiny models); the numbers mean nothing"]
    if options.scale == "reduced":
        return ExtractionSettings(
            adm_preset="256x256_uncond",
            adm_size=PathSize(128, 128, 1),
            adm_layer=6,
            adm_timestep=30,
            sd_tiny=False,
            sd_size=PathSize(128, 128, 2),
            sd_timestep=100,
            adm_full_size=full_adm,
            sd_full_size=full_sd,
            repeats=options.repeats_or(2),
            warmup=0,
            matmul_size=2048,
        ), [
            "reduced sizes on CPU: official ADM at 128x128 with 1 ensemble member and SD 2.1 at 128x128 "
            "with 2 members, one frame per call (480x832 x 8 members would take minutes per frame); the "
            "ratios hold per FLOP, and the DAVIS-17 trial is projected from FLOPs at the measured rate",
            "the fp32 agreement check doubles as the warm-up; the timed calls follow",
        ]
    cpu_note = ["--full on CPU: DAVIS-scale sizes, one repeat (each frame takes minutes)"]
    return ExtractionSettings(
        adm_preset="256x256_uncond",
        adm_size=full_adm,
        adm_layer=6,
        adm_timestep=30,
        sd_tiny=False,
        sd_size=full_sd,
        sd_timestep=100,
        adm_full_size=full_adm,
        sd_full_size=full_sd,
        repeats=options.repeats_or(5 if options.device == "cuda" else 1),
        warmup=2 if options.device == "cuda" else 0,
        matmul_size=8192 if options.device == "cuda" else 4096,
    ), ([] if options.device == "cuda" else cpu_note)


# -- FLOP counting on the meta device ----------------------------------------------------------------


def count_flops(function: Callable[[], object]) -> int:
    """FLOPs of one call (1 multiply-add = 2), with every tensor on the meta device: shapes only."""
    with FlopCounterMode(display=False) as counter:
        function()
    return int(counter.get_total_flops())


def adm_flops(config: ADMConfig, height: int, width: int, layers: list[int | None]) -> list[int]:
    """FLOPs of one image through the whole ADM UNet (None) or up to each decoder block in ``layers``."""
    with torch.device("meta"):
        net = ADMUNet(config)
        image = torch.empty(1, config.in_channels, height, width)
        step = torch.zeros(1, dtype=torch.int64)
    counts = []
    for layer in layers:
        if layer is None:
            counts.append(count_flops(lambda: net(image, step)))
        else:
            counts.append(count_flops(lambda layer=layer: net.decoder_features(image, step, [layer])))
    return counts


# -- ADM ---------------------------------------------------------------------------------------------


def random_adm_config(preset: str) -> ADMConfig:
    """The architecture of ``preset`` under a name without published weights, so it is built with random
    weights instead of being downloaded."""
    base = {"256x256_uncond": ADM_256_UNCOND, "tiny": ADM_TINY}[preset]
    return dataclasses.replace(base, preset=f"{base.preset}-random-weights")


def released_adm_features(
    backbone: ADMBackbone,
    frames: torch.Tensor,
    *,
    timestep: int,
    layer: int,
    ensemble_size: int,
    seed: int,
    sequence: str,
    frame_indices: list[int],
) -> torch.Tensor:
    """The released path: noise every member, run the full UNet in fp32, keep one block's output (hook).

    Draws the same noise as :meth:`ADMBackbone.extract` so that the two can be compared.
    """
    net = backbone.net
    batch, _, height, width = frames.shape
    noise = torch.stack(
        [
            torch.randn(
                (ensemble_size, 3, height, width), generator=frame_generator(seed, sequence, i, "cpu")
            )
            for i in frame_indices
        ]
    ).to(backbone.device)
    alphabar = float(backbone.alphas_cumprod[timestep])
    clean = frames.to(backbone.device, torch.float32)[:, None]
    noisy = (alphabar**0.5 * clean + (1.0 - alphabar) ** 0.5 * noise).reshape(-1, 3, height, width)
    captured: dict[str, torch.Tensor] = {}
    hook = net.output_blocks[layer].register_forward_hook(lambda _m, _a, out: captured.__setitem__("f", out))
    try:
        with torch.no_grad():
            net(noisy, torch.full((noisy.shape[0],), timestep, device=backbone.device))
    finally:
        hook.remove()
    features = captured["f"].float()
    return features.reshape(batch, ensemble_size, *features.shape[1:]).mean(dim=1).cpu()


def _relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    scale = float(reference.abs().max()) or 1.0
    return float((ours.float() - reference.float()).abs().max()) / scale


def _frames(size: PathSize, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (torch.rand((1, 3, size.height, size.width), generator=generator) * 2 - 1).to(device)


def _variant_row(
    name: str, timing: Timing, flops: int, baseline_seconds: float | None, peak_tflops: float
) -> dict[str, Any]:
    achieved = flops / timing.median / 1e12
    return {
        "variant": name,
        **timing.to_dict(),
        "flops_per_frame": flops,
        "achieved_tflops": achieved,
        "fraction_of_matmul_rate": achieved / peak_tflops,
        "speedup_vs_released": (baseline_seconds / timing.median) if baseline_seconds else 1.0,
    }


def _release_memory() -> None:
    """Return the memory of models dropped between phases (once per phase, never inside a timed loop)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _adm_fp32_phase(
    config: ADMConfig,
    frames: torch.Tensor,
    layer: int,
    call: dict[str, Any],
    settings: ExtractionSettings,
    device: str,
) -> tuple[dict[str, Timing], float, torch.Tensor | None]:
    """Released vs stop-at-layer on one fp32 model: (timings, relative difference, our features as the
    reference for the bf16 variants when those are timed). The model is dropped when this returns."""
    plain = ADMBackbone(config, device=device, dtype="fp32").load()

    def released() -> torch.Tensor:
        return released_adm_features(plain, frames, layer=layer, frame_indices=[0], **call)

    def stop_at_layer() -> torch.Tensor:
        return plain.extract(frames, layers=[layer], frame_indices=[0], **call)[layer]

    timings, difference = _checked_fp32_timings("ADM", released, stop_at_layer, settings, device)
    reference = stop_at_layer().float() if bf16_variants(device) else None
    return timings, difference, reference


def _checked_fp32_timings(
    model: str,
    released: Callable[[], torch.Tensor],
    ours: Callable[[], torch.Tensor],
    settings: ExtractionSettings,
    device: str,
) -> tuple[dict[str, Timing], float]:
    """Timings of the released and our fp32 path ("released", "ours"), interleaved, once their features
    agree to FP32_AGREEMENT (relative); and that difference."""
    difference = _relative_difference(ours(), released())
    if difference > FP32_AGREEMENT:
        raise RuntimeError(f"{model}: our fp32 features and the released path's differ by {difference:.3g}")
    timings = time_interleaved(
        {"released": released, "ours": ours}, repeats=settings.repeats, warmup=settings.warmup, device=device
    )
    return timings, difference


def bf16_variants(device: str) -> bool:
    """Whether the reduced-precision path is timed: on CUDA, and on CPUs with native bf16 products."""
    return device == "cuda" or (device == "cpu" and cpu_has_native_bf16())


def benchmark_adm(settings: ExtractionSettings, options: BenchOptions, peak_tflops: float) -> dict[str, Any]:
    device = options.device
    config = random_adm_config(settings.adm_preset)
    size, layer, timestep = settings.adm_size, settings.adm_layer, settings.adm_timestep
    frames = _frames(size, device)
    call = {"timestep": timestep, "ensemble_size": size.ensemble_size, "seed": 0, "sequence": "bench"}

    full_flops, layer_flops = (
        count * size.ensemble_size for count in adm_flops(config, size.height, size.width, [None, layer])
    )
    davis = settings.adm_full_size
    davis_full, davis_layer = (
        count * davis.ensemble_size for count in adm_flops(config, davis.height, davis.width, [None, layer])
    )

    timings, difference, reference = _adm_fp32_phase(config, frames, layer, call, settings, device)
    baseline_seconds = timings["released"].median
    rows = [
        _variant_row("released: full UNet, fp32", timings["released"], full_flops, None, peak_tflops),
        _variant_row(
            "ours: stop at layer, fp32", timings["ours"], layer_flops, baseline_seconds, peak_tflops
        ),
    ]
    _release_memory()

    if bf16_variants(device):
        variants = [("ours: stop at layer, bf16, channels_last", False)]
        if options.compile and device == "cuda":
            variants.append(("ours: stop at layer, bf16, channels_last, compiled", True))
        for name, compiled in variants:
            fast = ADMBackbone(
                config, device=device, dtype="bf16", channels_last=True, compile=compiled
            ).load()

            def fast_call(backbone: ADMBackbone = fast) -> torch.Tensor:
                return backbone.extract(frames, layers=[layer], frame_indices=[0], **call)[layer]

            error = _relative_difference(fast_call(), reference)
            timing = time_calls(fast_call, repeats=settings.repeats, warmup=settings.warmup, device=device)
            rows.append(_variant_row(name, timing, layer_flops, baseline_seconds, peak_tflops))
            rows[-1]["relative_difference_vs_fp32"] = error
            del fast, fast_call
            _release_memory()

    best = min(rows[1:], key=lambda row: row["median_seconds"])
    measured_at_davis = size == davis
    per_frame_davis = (
        best["median_seconds"] if measured_at_davis else davis_layer / (best["achieved_tflops"] * 1e12)
    )
    released_davis = (
        baseline_seconds if measured_at_davis else davis_full / (rows[0]["achieved_tflops"] * 1e12)
    )
    return {
        "architecture": config.preset,
        "size": asdict(size),
        "layer": layer,
        "timestep": timestep,
        "fp32_agreement_relative": difference,
        "variants": rows,
        "best": best["variant"],
        "speedup": best["speedup_vs_released"],
        "flops_davis_frame": {"full_unet": davis_full, "to_layer": davis_layer, "size": asdict(davis)},
        "davis17_val_trial_seconds": {
            "ours": per_frame_davis * DAVIS17_VAL_FRAMES,
            "released": released_davis * DAVIS17_VAL_FRAMES,
            "projected_from_flops": not measured_at_davis,
        },
    }


# -- Stable Diffusion 2.1 ----------------------------------------------------------------------------


def sd21_config_dir(options: BenchOptions) -> Path | None:
    folder = options.sd21_config or (SHARED_REFERENCE / "sd21")
    return folder if (Path(folder) / "unet" / "config.json").is_file() else None


def build_sd21_components(folder: Path, seed: int = 0) -> Any:
    """SD 2.1's UNet, VAE, text encoder, tokenizer and scheduler from its configs, with random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from backbones.sd import SDComponents

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(folder / "scheduler"))
    return SDComponents(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer, scheduler)


class _StopHere(Exception):
    """Raised from a hook to end a meta-device forward pass at the requested layer."""


@contextmanager
def _capture(module: torch.nn.Module, store: dict[str, torch.Tensor], stop: bool) -> Iterator[None]:
    def hook(_module: torch.nn.Module, _args: object, output: torch.Tensor) -> None:
        store["f"] = output
        if stop:
            raise _StopHere

    handle = module.register_forward_hook(hook)
    try:
        yield
    except _StopHere:
        pass
    finally:
        handle.remove()


def sd_flops(components: Any, height: int, width: int, layer: Any, vae_scale: int) -> dict[str, int]:
    """FLOPs of one VAE encode (one image), one full UNet pass and one pass up to ``layer`` (one latent)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from backbones.sd import decoder_modules

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(components.unet.config)
        vae = AutoencoderKL.from_config(components.vae.config)
        image = torch.empty(1, 3, height, width)
        latent = torch.empty(1, unet.config.in_channels, height // vae_scale, width // vae_scale)
        context = torch.empty(1, components.tokenizer.model_max_length, unet.config.cross_attention_dim)
        step = torch.zeros(1, dtype=torch.int64)
    encode = count_flops(lambda: vae.encode(image).latent_dist.mean)
    full = count_flops(lambda: unet(latent, step, encoder_hidden_states=context))
    store: dict[str, torch.Tensor] = {}

    def to_layer() -> None:
        with _capture(decoder_modules(unet)[layer], store, stop=True):
            unet(latent, step, encoder_hidden_states=context)

    return {"vae_encode": encode, "unet_full": full, "unet_to_layer": count_flops(to_layer)}


def released_sd_features(
    backbone: Any,
    frames: torch.Tensor,
    *,
    timestep: int,
    layer: Any,
    ensemble_size: int,
    seed: int,
    sequence: str,
    frame_indices: list[int],
) -> torch.Tensor:
    """The released path: encode the frame once per ensemble member, run the full UNet, keep one layer.

    Latent draws and noise come from the same per-frame generators, in the same order, as in
    :meth:`StableDiffusionBackbone.extract`, so that the two paths compute the same features.
    """
    from backbones.sd import decoder_modules

    device = backbone.device
    batch = frames.shape[0]
    repeated = frames.to(device, torch.float32).repeat_interleave(ensemble_size, dim=0)
    with torch.no_grad():
        posterior = backbone.vae.encode(repeated).latent_dist
        latents, noises = [], []
        for i, frame_index in enumerate(frame_indices):
            members = slice(i * ensemble_size, (i + 1) * ensemble_size)
            generator = frame_generator(seed, sequence, frame_index, device)
            mean, std = posterior.mean[members], posterior.std[members]
            draw = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
            latents.append(mean + std * draw)
            noises.append(torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype))
        clean = torch.cat(latents)
        shift = backbone.vae.config.get("shift_factor")
        if shift is not None:
            clean = clean - shift
        clean = clean * backbone.vae.config.scaling_factor
        steps = torch.full((clean.shape[0],), timestep, dtype=torch.long, device=device)
        noisy = backbone.scheduler.add_noise(clean, torch.cat(noises), steps)
        context = backbone.empty_prompt_embedding().expand(noisy.shape[0], -1, -1)
        store: dict[str, torch.Tensor] = {}
        with _capture(decoder_modules(backbone.unet)[layer], store, stop=False):
            backbone.unet(noisy, steps, encoder_hidden_states=context)
    features = store["f"].float()
    return features.reshape(batch, ensemble_size, *features.shape[1:]).mean(dim=1).cpu()


def benchmark_sd(settings: ExtractionSettings, options: BenchOptions, peak_tflops: float) -> dict[str, Any]:
    from backbones.sd import StableDiffusionBackbone, build_tiny_components

    device = options.device
    if settings.sd_tiny:
        components, source = build_tiny_components(0), "sd-tiny (random)"
    else:
        folder = sd21_config_dir(options)
        if folder is None:
            wanted = options.sd21_config or (SHARED_REFERENCE / "sd21")
            return {"skipped": f"no SD 2.1 configs at {wanted} (pass --sd21-config DIR)"}
        components, source = build_sd21_components(folder), f"SD 2.1 architecture from {folder} (random)"
    plain = StableDiffusionBackbone(components, name="sd2.1-arch", identity="bench/random", device=device)
    size, timestep = settings.sd_size, settings.sd_timestep
    layer = plain.default_layer
    if size.height % plain.size_multiple or size.width % plain.size_multiple:
        raise ConfigError(f"SD input {size.height}x{size.width} is not a multiple of {plain.size_multiple}")
    frames = _frames(size, device)
    call = {"timestep": timestep, "ensemble_size": size.ensemble_size, "seed": 0, "sequence": "bench"}

    def per_frame_flops(path: PathSize) -> tuple[int, int]:
        counts = sd_flops(components, path.height, path.width, layer, plain.vae_scale)
        released_flops = path.ensemble_size * (counts["vae_encode"] + counts["unet_full"])
        ours_flops = counts["vae_encode"] + path.ensemble_size * counts["unet_to_layer"]
        return released_flops, ours_flops

    released_flops, ours_flops = per_frame_flops(size)
    davis_released, davis_ours = per_frame_flops(settings.sd_full_size)

    def released() -> torch.Tensor:
        return released_sd_features(plain, frames, layer=layer, frame_indices=[0], **call)

    def ours_fp32() -> torch.Tensor:
        return plain.extract(frames, layers=[layer], frame_indices=[0], **call)[layer]

    timings, difference = _checked_fp32_timings("SD", released, ours_fp32, settings, device)
    baseline_seconds = timings["released"].median
    rows = [
        _variant_row(
            "released: VAE per member, full UNet, fp32",
            timings["released"],
            released_flops,
            None,
            peak_tflops,
        ),
        _variant_row(
            "ours: VAE once, stop at layer, fp32", timings["ours"], ours_flops, baseline_seconds, peak_tflops
        ),
    ]
    if device == "cuda":
        reference = ours_fp32()
        fast = StableDiffusionBackbone(
            components,
            name="sd2.1-arch",
            identity="bench/random",
            device=device,
            dtype="bf16",
            channels_last=True,
        )

        def fast_call() -> torch.Tensor:
            return fast.extract(frames, layers=[layer], frame_indices=[0], **call)[layer]

        error = _relative_difference(fast_call(), reference)
        timing = time_calls(fast_call, repeats=settings.repeats, warmup=settings.warmup, device=device)
        rows.append(
            _variant_row(
                "ours: VAE once, stop at layer, bf16, channels_last",
                timing,
                ours_flops,
                baseline_seconds,
                peak_tflops,
            )
        )
        rows[-1]["relative_difference_vs_fp32"] = error
    best = min(rows[1:], key=lambda row: row["median_seconds"])
    measured_at_davis = size == settings.sd_full_size
    ours_davis = (
        best["median_seconds"] if measured_at_davis else davis_ours / (best["achieved_tflops"] * 1e12)
    )
    released_davis = (
        baseline_seconds if measured_at_davis else davis_released / (rows[0]["achieved_tflops"] * 1e12)
    )
    return {
        "architecture": source,
        "size": asdict(size),
        "layer": layer,
        "timestep": timestep,
        "fp32_agreement_relative": difference,
        "variants": rows,
        "best": best["variant"],
        "speedup": best["speedup_vs_released"],
        "flops_davis_frame": {
            "released": davis_released,
            "ours": davis_ours,
            "size": asdict(settings.sd_full_size),
        },
        "davis17_val_trial_seconds": {
            "ours": ours_davis * DAVIS17_VAL_FRAMES,
            "released": released_davis * DAVIS17_VAL_FRAMES,
            "projected_from_flops": not measured_at_davis,
        },
    }


# -- the benchmark -----------------------------------------------------------------------------------


def run(options: BenchOptions) -> dict[str, Any]:
    settings, notes = settings_for(options)
    # the ceiling the issue names is the bf16 matmul rate; a CPU without bf16 instructions has only fp32
    dtype = torch.bfloat16 if bf16_variants(options.device) else torch.float32
    rate = matmul_rate(options.device, dtype, settings.matmul_size)
    adm = benchmark_adm(settings, options, rate["tflops"])
    _release_memory()
    sd = benchmark_sd(settings, options, rate["tflops"])
    _release_memory()
    if "skipped" in sd:
        notes.append(f"SD 2.1 skipped: {sd['skipped']}")
    notes += [
        "FLOPs counted with torch.utils.flop_counter.FlopCounterMode on the meta device (1 multiply-add = 2)",
        f"matmul rate: {rate['dtype']} {rate['size']}x{rate['size']} product, fastest of 5 (median "
        f"{rate['median_tflops']:.3g} TFLOP/s); the 'of matmul' column divides by the fastest",
        "both networks have random weights (speed does not depend on their values)",
    ]
    if options.device == "cuda" and not options.compile:
        notes.append("torch.compile not timed (pass --compile)")
    targets: dict[str, Any] = {
        "adm_speedup_at_least": TARGET_SPEEDUP,
        "adm_fraction_of_bf16_matmul_at_least": TARGET_MATMUL_FRACTION,
    }
    best = next(row for row in adm["variants"] if row["variant"] == adm["best"])
    if options.device == "cuda" and not options.quick:
        targets["speedup_met"] = adm["speedup"] >= TARGET_SPEEDUP
        targets["matmul_fraction_met"] = best["fraction_of_matmul_rate"] >= TARGET_MATMUL_FRACTION
    elif options.quick:
        targets["status"] = "not judged"
    else:
        targets["status"] = "GPU targets: not measurable on a CPU run"
        if dtype == torch.bfloat16:  # the same measures on this CPU, for information (reduced size)
            targets["this_cpu"] = {
                "speedup": adm["speedup"],
                "speedup_met": adm["speedup"] >= TARGET_SPEEDUP,
                "fraction_of_bf16_matmul": best["fraction_of_matmul_rate"],
                "matmul_fraction_met": best["fraction_of_matmul_rate"] >= TARGET_MATMUL_FRACTION,
            }
    return {
        "settings": asdict(settings) | {"scale": options.scale, "device": options.device},
        "notes": notes,
        "matmul_rate": rate,
        "adm": adm,
        "sd21": sd,
        "targets": targets,
    }


def _model_table(title: str, model: dict[str, Any]) -> list[str]:
    if "skipped" in model:
        return [f"{title}: skipped ({model['skipped']})"]
    size = model["size"]
    rows = [
        [
            row["variant"],
            row["median_seconds"],
            row["speedup_vs_released"],
            row["flops_per_frame"] / 1e9,
            row["achieved_tflops"],
            row["fraction_of_matmul_rate"],
        ]
        for row in model["variants"]
    ]
    trial = model["davis17_val_trial_seconds"]
    how = "projected from FLOPs at the measured rates" if trial["projected_from_flops"] else "measured"
    davis = model["flops_davis_frame"]["size"]
    agreement = model["fp32_agreement_relative"]
    return [
        f"{title}: {size['height']}x{size['width']}, {size['ensemble_size']} member(s) per frame, layer "
        f"{model['layer']}, t={model['timestep']}; fp32 paths agree to {agreement:.1e} (relative)",
        format_table(["path", "s/frame", "speed-up", "GFLOP/frame", "TFLOP/s", "of matmul"], rows),
        f"one DAVIS-17 val trial ({DAVIS17_VAL_FRAMES} frames at {davis['height']}x{davis['width']} x "
        f"{davis['ensemble_size']}): ours {trial['ours'] / 3600:.2f} h, released "
        f"{trial['released'] / 3600:.2f} h ({how})",
    ]


def format_report(report: dict[str, Any]) -> str:
    rate = report["matmul_rate"]
    lines = [f"device matmul rate ({rate['dtype']}, {rate['size']}^3): {rate['tflops']:.3f} TFLOP/s"]
    lines += _model_table("ADM", report["adm"])
    lines += _model_table("SD 2.1", report["sd21"])
    targets = report["targets"]
    if "speedup_met" in targets:
        lines.append(
            f"GPU targets: ADM speed-up >= {TARGET_SPEEDUP:g}x "
            f"{'met' if targets['speedup_met'] else 'MISSED'}, "
            f">= half the bf16 matmul rate {'met' if targets['matmul_fraction_met'] else 'MISSED'}"
        )
    else:
        lines.append(f"targets: {targets['status']}")
    if "this_cpu" in targets:
        cpu = targets["this_cpu"]
        lines.append(
            f"the same measures on this CPU (bf16 instructions, reduced size): ADM speed-up "
            f"{cpu['speedup']:.2f}x (>= {TARGET_SPEEDUP:g}x {'met' if cpu['speedup_met'] else 'missed'}), "
            f"{cpu['fraction_of_bf16_matmul']:.2f} of the bf16 matmul rate "
            f"(>= {TARGET_MATMUL_FRACTION:g} {'met' if cpu['matmul_fraction_met'] else 'missed'})"
        )
    return "\n".join(lines)
