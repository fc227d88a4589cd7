"""The settings a run derives from its machine and config (`auto` values), resolved once at the top of
`train()` so the saved config, MLflow params and checkpoint record what really ran."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from agecls.data.augment import build_augment
from agecls.data.device_augment import translate_pipeline


def _several_devices(cfg: DictConfig) -> bool:
    devices = cfg.trainer.get("devices", 1)
    return (isinstance(devices, int) and devices > 1) or (
        not isinstance(devices, int) and str(devices) != "1"
    )


def _on_cuda(cfg: DictConfig) -> bool:
    """Whether this run trains on a CUDA GPU (trainer.accelerator auto, gpu or cuda, and CUDA present)."""
    return (
        str(cfg.trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    )


def cpu_bf16() -> str | None:
    """The CPU instructions that make bf16 autocast and channels-last convolutions its fastest path
    (AVX512-BF16 or AMX, through oneDNN), or None: there bf16 is emulated and slower than float32."""
    import torch.cpu

    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def _fast_path(cfg: DictConfig, cuda: bool) -> tuple[bool, bool, str]:
    """(bf16-mixed?, channels_last?, why) of the machine this run trains on."""
    if cuda:
        bf16 = torch.cuda.is_bf16_supported()
        return bf16, True, "a bf16 CUDA GPU" if bf16 else "a CUDA GPU without bf16"
    if str(cfg.trainer.get("accelerator", "auto")) not in ("auto", "cpu"):
        return False, False, f"trainer.accelerator={cfg.trainer.accelerator}"
    isa = cpu_bf16()
    if isa:
        return True, True, f"a CPU with {isa}"
    return False, False, "a CPU without AVX512-BF16 or AMX"


def resolve_auto(cfg: DictConfig) -> dict[str, str]:
    """Replace the `auto` values of data.pipeline, trainer.precision and trainer.channels_last in `cfg` by
    what this machine runs, so the saved config, MLflow params and checkpoint record the real setting; and
    callbacks.early_stopping.enabled by what the scheduler allows (off under a whole-run schedule).

    On a CUDA GPU: the device pipeline (when there is one device and every augment.train step has a device
    version; else the loader pipeline), bf16-mixed precision (when the GPU supports bf16, else 32-true) and
    channels_last. On a CPU with AVX512-BF16 or AMX: the loader pipeline, bf16-mixed and channels_last
    (1.7x faster than float32 at equal quality, BENCHMARKS.md). Anywhere else: the loader pipeline,
    32-true, contiguous memory. Returns {key: reason} for the keys it resolved."""
    cuda = _on_cuda(cfg)
    why: dict[str, str] = {}
    with open_dict(cfg):
        if str(cfg.data.get("pipeline", "auto")) == "auto":
            pipeline, reason = ("device", "a CUDA GPU") if cuda else ("loader", "no CUDA GPU")
            if cuda and _several_devices(cfg):
                pipeline, reason = "loader", f"trainer.devices={cfg.trainer.devices}"
            if pipeline == "device":
                try:
                    translate_pipeline(build_augment(cfg.augment, cfg.data).train)
                except ValueError as exc:
                    pipeline, reason = (
                        "loader",
                        str(exc).split(" has no device version")[0] + " has no device version",
                    )
            cfg.data.pipeline = pipeline
            why["data.pipeline"] = f"{pipeline} ({reason})"
        bf16, channels_last, machine = _fast_path(cfg, cuda)
        if str(cfg.trainer.get("precision", "auto")) == "auto":
            cfg.trainer.precision = "bf16-mixed" if bf16 else "32-true"
            why["trainer.precision"] = f"{cfg.trainer.precision} ({machine})"
        if cfg.trainer.get("channels_last", False) not in (True, False, "auto"):
            raise ValueError(f"trainer.channels_last={cfg.trainer.channels_last!r}; valid: true, false, auto")
        if str(cfg.trainer.get("channels_last", False)) == "auto":
            cfg.trainer.channels_last = channels_last
            why["trainer.channels_last"] = f"{str(channels_last).lower()} ({machine})"
        stop = (cfg.get("callbacks") or {}).get("early_stopping")
        enabled = None if stop is None else stop.get("enabled")
        if stop is not None and enabled not in (True, False, "auto"):
            raise ValueError(f"callbacks.early_stopping.enabled={enabled!r}; valid: true, false, auto")
        if enabled == "auto":
            scheduler = cfg.get("scheduler") or {}
            planned = sorted(scheduler.get("from_trainer") or {})
            stop.enabled = not planned
            name = scheduler.get("name", "none")
            why["callbacks.early_stopping.enabled"] = (
                f"false (scheduler={name} plans the whole run: {', '.join(planned)} from the trainer)"
                if planned
                else f"true (scheduler={name} does not plan the run's length)"
            )
    return why


def check_pipeline(cfg: DictConfig) -> str:
    """`data.pipeline` (after resolve_auto), checked against the trainer: the device pipeline stages the
    cache on one device, so it needs trainer.devices=1."""
    check_resolved(cfg)
    pipeline = str(cfg.data.get("pipeline", "loader"))
    if pipeline not in ("loader", "device"):
        raise ValueError(f"data.pipeline={pipeline!r}; valid: auto, loader, device")
    devices = cfg.trainer.get("devices", 1)
    if pipeline == "device" and _several_devices(cfg):
        raise ValueError(
            f"data.pipeline=device stages the image cache on one device, but trainer.devices={devices}; "
            f"valid: trainer.devices=1, or data.pipeline=loader for several devices"
        )
    return pipeline


AUTO_KEYS = (
    "data.pipeline",
    "trainer.precision",
    "trainer.channels_last",
    "callbacks.early_stopping.enabled",
)


def check_resolved(cfg: DictConfig) -> None:
    """ValueError when a key `resolve_auto` settles is still `auto`: the builders below `train()` take a
    config whose machine-dependent settings were resolved once, at its top."""
    left = [key for key in AUTO_KEYS if str(OmegaConf.select(cfg, key, default=None)) == "auto"]
    if left:
        raise ValueError(f"{', '.join(left)}=auto not resolved; call resolve_auto(cfg) first")
