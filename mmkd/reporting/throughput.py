"""Encoding throughput of CLIP models on this machine: the compression report's speed columns.

:func:`compare_throughput` times the image and text encoders of several models on the same fixed synthetic batch,
interleaved (:func:`mmkd.reporting.timing.interleaved_times`), so a passing load on the machine is spread over all
of them. A model is anything with ``CLIPModel``'s ``get_image_features`` / ``get_text_features`` and ``config``:
a ``CLIPModel``, its dynamic-int8 copy, or an ONNX export in onnxruntime (:class:`mmkd.interop.to_onnx.ONNXCLIP`,
which has no parameters and runs on the CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmkd.reporting.timing import interleaved_times, median_rate

__all__ = ["check_counts", "compare_throughput", "measure_throughput"]


def check_counts(**counts: tuple[Any, int]) -> None:
    """Each ``name=(value, minimum)`` must be an integer (not a bool) >= minimum."""
    for name, (value, minimum) in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _synthetic_inputs(
    model: nn.Module, batch_size: int, text_length: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed (pixels, input_ids, attention_mask) of the model's image size and context length."""
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    context = int(tcfg.max_position_embeddings)
    length = context if text_length is None else int(text_length)
    if not 2 <= length <= context:
        raise ValueError(f"text_length must be in [2, {context}] (the context length), got {text_length}")
    gen = torch.Generator().manual_seed(seed)
    size = int(vcfg.image_size)
    pixels = torch.randn(batch_size, int(vcfg.num_channels), size, size, generator=gen)
    # the end-of-text id closes every text, where transformers pools (the largest id for legacy eos_token_id=2)
    eos = int(tcfg.eos_token_id) if tcfg.eos_token_id not in (None, 2) else int(tcfg.vocab_size) - 1
    ids = torch.randint(0, min(eos, int(tcfg.vocab_size) - 2), (batch_size, length), generator=gen)
    ids[:, -1] = eos
    return pixels, ids, torch.ones_like(ids)


def compare_throughput(
    models: dict[str, nn.Module], *, batch_size: int = 32, repeats: int = 5, warmup: int = 1,
    text_length: int | None = None, seed: int = 0,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Image and text encoding throughput of several ``CLIPModel`` s (int8 copies included) on this machine.

    Inputs are fixed and synthetic -- ``batch_size`` random images of each model's image size, ``batch_size``
    texts of ``text_length`` token ids (default: the full context length, what open_clip always runs) ending in
    the end-of-text id -- so the data pipeline is excluded and every model sees the same work per item. The
    encoders (one ``get_*_features`` call under ``torch.inference_mode`` each) are timed by
    :func:`mmkd.reporting.timing.interleaved_times`: ``warmup`` untimed rounds, then ``repeats`` rounds in which
    every model encodes one image batch and one text batch in turn, so a passing load on the machine is spread
    over all of them. The rate is ``batch_size`` / the median time; the individual times are returned too, to
    judge how disturbed a measurement was, and ``cpu_share`` (:meth:`~mmkd.reporting.timing.Timings.cpu_share`)
    whether other processes shared the cores. torch's thread count is not touched.

    Returns ``{name: {"image_per_s", "text_per_s", "image_seconds", "text_seconds", "batch_size", "repeats",
    "warmup", "image_size", "text_length", "threads", "cpu_share"}}``.
    """
    check_counts(batch_size=(batch_size, 1), repeats=(repeats, 1), warmup=(warmup, 0))
    if not models:
        raise ValueError("no models to measure")
    inputs, tasks = {}, {}
    for name, model in models.items():
        weight = next(model.parameters(), None)  # an ONNXCLIP has none: onnxruntime on the CPU
        device = weight.device if weight is not None else torch.device("cpu")
        px, ids, mask = inputs[name] = [t.to(device) for t in _synthetic_inputs(model, batch_size, text_length, seed)]
        tasks[name, "image"] = _encode(device, model.get_image_features, pixel_values=px)
        tasks[name, "text"] = _encode(device, model.get_text_features, input_ids=ids, attention_mask=mask)

    modes = {name: model.training for name, model in models.items()}
    try:
        for model in models.values():
            model.eval()
        with torch.inference_mode():
            timings = interleaved_times(tasks, repeats=repeats, warmup=warmup)
    finally:
        for name, model in models.items():
            model.train(modes[name])
    times = timings.seconds
    return {
        name: {
            "image_per_s": median_rate(times[name, "image"], batch_size),
            "text_per_s": median_rate(times[name, "text"], batch_size),
            "image_seconds": times[name, "image"],
            "text_seconds": times[name, "text"],
            "batch_size": batch_size,
            "repeats": repeats,
            "warmup": warmup,
            "image_size": int(inputs[name][0].shape[-1]),
            "text_length": int(inputs[name][1].shape[1]),
            "threads": torch.get_num_threads(),
            "cpu_share": timings.cpu_share(),
        }
        for name in models
    }


def _encode(device: torch.device, encoder, **batch: torch.Tensor):
    """One encoder call on a fixed batch, finished on the device before it returns (so its time is the work's);
    returns nothing, so no output is kept between calls."""

    def call() -> None:
        encoder(**batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return call


def measure_throughput(model: nn.Module, **kwargs: Any) -> dict[str, Any]:
    """:func:`compare_throughput` of one model (same keyword arguments, same result for that model)."""
    return compare_throughput({"model": model}, **kwargs)["model"]
