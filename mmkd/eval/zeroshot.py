"""Zero-shot image classification by CLIP_benchmark's protocol, comparable with its published tables.

The protocol (LAION-AI/CLIP_benchmark, ``clip_benchmark/metrics/zeroshot_classification.py``):

* every class name is put into every prompt template (``template.format(c=classname)``); the class embedding
  is the L2-normalised mean of the L2-normalised prompt embeddings (:func:`zero_shot_classifier`);
* an image's logits are ``100 * image_embedding @ classifier`` (cosine similarity times 100);
* reported: top-1 accuracy, top-5 accuracy (only with at least 5 classes) and the mean per-class recall
  (balanced accuracy: the mean over the classes that have images of the fraction of their images classified
  correctly).

Class names and templates for CIFAR-10, CIFAR-100 and STL-10 are CLIP_benchmark's, shipped in
``mmkd/eval/data/`` (sources in its ``README.md``). Any other dataset uses its own class names and
CLIP_benchmark's fallback templates, OpenAI's 80 ImageNet prompts (key ``"default"`` of
``zeroshot_templates.json``).

Accuracies are fractions in ``[0, 1]`` (the CLI prints them as percentages).

Under a multi-process launch (``accelerate launch`` / ``torchrun``), every process must call
:func:`evaluate_zeroshot`: the images are split across processes by index (process ``r`` of ``W`` takes images
``r, r + W, r + 2W, ...``, no padding), the top-k predictions are gathered with their image indices, and every
process computes the same metrics from exactly one prediction per image.

Command line::

    python -m mmkd.eval.zeroshot --model ViT-B-32 --pretrained openai --dataset cifar10,cifar100 \\
        --data-dir /data --output results.json
    accelerate launch --num_processes 4 -m mmkd.eval.zeroshot --model runs/student --dataset stl10 \\
        --data-dir /data
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from mmkd.eval.encoders import CLIPEncoder, load_encoder

__all__ = [
    "default_classnames",
    "default_templates",
    "evaluate_zeroshot",
    "zero_shot_classifier",
    "zeroshot_metrics",
]

DATA_DIR = Path(__file__).resolve().parent / "data"
TOP_K = 5  # acc@5, reported only when a dataset has at least this many classes


# -- class names and templates -------------------------------------------------------------------------------
@functools.cache
def _data_file(name: str) -> dict[str, list[str]]:
    with open(DATA_DIR / name, encoding="utf-8") as f:
        return json.load(f)


def default_classnames(dataset_name: str | None) -> list[str] | None:
    """CLIP_benchmark's class names for ``cifar10``, ``cifar100`` and ``stl10``; ``None`` for other names."""
    names = _data_file("zeroshot_classnames.json").get(dataset_name or "")
    return list(names) if names is not None else None


def default_templates(dataset_name: str | None = None) -> list[str]:
    """CLIP_benchmark's templates for ``dataset_name`` (18 for CIFAR-10/100, 2 for STL-10), else its fallback.

    The fallback, used for every other dataset, is the ``imagenet1k`` list: OpenAI's 80 generic prompts, which
    is what CLIP_benchmark itself uses for a dataset without templates of its own.
    """
    templates = _data_file("zeroshot_templates.json")
    return list(templates.get(dataset_name or "", templates["default"]))


def _check_templates(templates: Any, what: str = "templates") -> list[str]:
    """A non-empty list of strings, each with a ``{c}`` placeholder and no other field."""
    if isinstance(templates, str) or not isinstance(templates, (list, tuple)) or not templates:
        raise ValueError(
            f"{what} must be a non-empty list of strings such as 'a photo of a {{c}}.', got {templates!r}"
        )
    for t in templates:
        if not isinstance(t, str) or "{c}" not in t:
            raise ValueError(f"every template in {what} must be a string containing '{{c}}', got {t!r}")
        try:
            t.format(c="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"template {t!r} in {what} has a field other than {{c}}: {exc}") from None
    return list(templates)


def _check_classnames(classnames: Any, what: str = "classnames") -> list[str]:
    if isinstance(classnames, str) or not isinstance(classnames, (list, tuple)) or not classnames:
        raise ValueError(f"{what} must be a non-empty list of class names, got {classnames!r}")
    for c in classnames:
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"every class name in {what} must be a non-empty string, got {c!r}")
    return list(classnames)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


# -- the maths -----------------------------------------------------------------------------------------------
def zero_shot_classifier(
    encoder, classnames: list[str], templates: list[str], batch_size: int = 256
) -> Tensor:
    """The zero-shot classifier: one L2-normalised text embedding per class, the columns of an (E, C) matrix.

    Every ``(class, template)`` prompt is encoded once, ``batch_size`` prompts at a time; a class's embedding
    is the normalised mean of its normalised prompt embeddings (CLIP_benchmark's ``zero_shot_classifier``).
    The result does not depend on the images, so build it once and pass it as ``classifier=`` to every
    :func:`evaluate_zeroshot` call on the same classes (e.g. at each evaluation of a training run whose text
    tower is frozen).

    Args:
        encoder: a :class:`~mmkd.eval.encoders.CLIPEncoder`, or anything else ``load_encoder`` takes without a
            processor (a model spec string, a ``CLIPTeacher``).
        classnames: the ``C`` class names, in label order.
        templates: prompt templates with a ``{c}`` placeholder.
        batch_size: prompts encoded at once.

    Returns:
        ``(E, C)`` float32 tensor on the encoder's device; ``image_embeddings @ classifier`` are cosine
        similarities.
    """
    classnames = _check_classnames(classnames)
    templates = _check_templates(templates)
    _check_int("batch_size", batch_size, 1)
    encoder = encoder if isinstance(encoder, CLIPEncoder) else load_encoder(encoder)
    prompts = [t.format(c=c) for c in classnames for t in templates]  # (C * T,), class-major
    emb = encoder.encode_texts(prompts, batch_size=batch_size)  # (C * T, E), each row normalised
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)  # (C, E)
    return F.normalize(emb, dim=-1).T.contiguous()  # (E, C)


def zeroshot_metrics(topk: Tensor, targets: Tensor, num_classes: int) -> dict[str, Any]:
    """Accuracy metrics from ranked predictions.

    Args:
        topk: ``(N, K)`` integer class indices, best first (``K >= min(5, num_classes)`` for acc@5).
        targets: ``(N,)`` integer labels in ``[0, num_classes)``.
        num_classes: ``C``.

    Returns:
        ``{"acc1", "acc5" (only when C >= 5), "mean_per_class_recall", "per_class_recall"}``: fractions in
        ``[0, 1]``; ``per_class_recall`` is a list of ``C`` entries, ``None`` for a class without images. The
        mean per-class recall averages the classes that have images, as
        ``sklearn.metrics.balanced_accuracy_score`` (CLIP_benchmark's metric) does.
    """
    if topk.ndim != 2 or targets.ndim != 1 or topk.shape[0] != targets.shape[0]:
        raise ValueError(
            f"topk must be (N, K) and targets (N,), got shapes {tuple(topk.shape)} and {tuple(targets.shape)}"
        )
    n = targets.shape[0]
    if n == 0:
        raise ValueError("no predictions: the dataset is empty")
    need_k = min(TOP_K, num_classes)
    if topk.shape[1] < need_k:
        raise ValueError(f"topk has {topk.shape[1]} columns, need {need_k} for {num_classes} classes")
    bad = (targets < 0) | (targets >= num_classes)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"label {int(targets[i])} of image {i} is not a class index in [0, {num_classes})")
    topk, targets = topk.long().cpu(), targets.long().cpu()
    correct = topk[:, :need_k] == targets[:, None]  # (N, K)
    # Counts over n in float64 (not a float32 mean), the same numbers CLIP_benchmark's ``accuracy`` gives.
    out: dict[str, Any] = {"acc1": int(correct[:, 0].sum()) / n}
    if num_classes >= TOP_K:
        out["acc5"] = int(correct.any(dim=1).sum()) / n
    hits = torch.bincount(targets[correct[:, 0]], minlength=num_classes)  # (C,)
    counts = torch.bincount(targets, minlength=num_classes)  # (C,)
    recall = [h / c if c else None for h, c in zip(hits.tolist(), counts.tolist(), strict=True)]
    present = [r for r in recall if r is not None]
    out["mean_per_class_recall"] = float(np.mean(present))  # numpy's summation order, as sklearn's
    out["per_class_recall"] = recall
    return out


# -- preparing a dataset -------------------------------------------------------------------------------------
@dataclass
class _Task:
    """A dataset ready to evaluate: the dataset, what it is called, its class names and templates."""

    name: str
    dataset: Any
    classnames: list[str]
    templates: list[str]


def _prepare(dataset, data_dir, split, classnames, templates) -> _Task:
    """Load ``dataset`` if it is a name/path and settle its class names and templates (before any model)."""
    if isinstance(dataset, (str, Path)):
        from mmkd.eval.datasets import DATASETS, load_classification_dataset

        spec = str(dataset)
        if data_dir is not None and not Path(data_dir).exists():
            raise FileNotFoundError(f"data_dir {str(data_dir)!r} does not exist (dataset {spec!r})")
        if spec.lower() not in (*DATASETS, "imagefolder") and Path(spec).exists():
            data_dir = None  # a path is complete in itself; data_dir (e.g. the CLI's) is for the named sets
        ds = load_classification_dataset(spec, data_dir=data_dir, split=split)
        name = spec
        known = spec if default_classnames(spec) is not None else getattr(ds, "name", None)
    else:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError(
                "dataset must be a name, a path or a Dataset of (PIL image, label) pairs, "
                f"got {type(dataset).__name__}"
            )
        ds = dataset
        name = getattr(ds, "name", None) or type(ds).__name__
        known = getattr(ds, "name", None)
    if len(ds) == 0:
        raise ValueError(f"dataset {name!r} has no images")

    own = getattr(ds, "classnames", None)
    if classnames is None:
        classnames = default_classnames(known)
        if classnames is not None and own is not None and len(own) != len(classnames):
            raise ValueError(
                f"dataset {name!r} has {len(own)} classes but the {known} class names list {len(classnames)}"
            )
        classnames = classnames if classnames is not None else own
        if classnames is None:
            raise ValueError(f"dataset {name!r} has no .classnames: pass classnames=[...] in label order")
    classnames = _check_classnames(classnames, f"the class names of {name!r}")
    templates = _check_templates(templates if templates is not None else default_templates(known))
    return _Task(name, ds, classnames, templates)


class _Collate:
    """(PIL image, label) pairs -> ((B, 3, H, W) pixels, (B,) labels) with the model's own preprocessing.

    Holds only the preprocessing (``Preprocessing``), not the model: it pickles cheaply into loader workers.
    """

    def __init__(self, inputs):
        self.inputs = inputs

    def __call__(self, batch: list[tuple[Any, int]]) -> tuple[Tensor, Tensor]:
        images = [img if img.mode == "RGB" else img.convert("RGB") for img, _ in batch]
        labels = torch.tensor([int(label) for _, label in batch], dtype=torch.long)  # (B,)
        return self.inputs.images(images), labels


def _gather_rows(rows: Tensor, total: int, state) -> Tensor:
    """Every process's ``(n_r, 2 + K)`` rows ``[index, label, top-k ...]`` -> one row per image, by index."""
    from accelerate.utils import gather

    world = state.num_processes
    per_process = math.ceil(total / world)  # the largest shard: shards of range(r, N, W) differ by at most 1
    padded = torch.full((per_process, rows.shape[1]), -1, dtype=torch.long)
    padded[: rows.shape[0]] = rows
    gathered = gather(padded.to(state.device)).cpu()  # (W * per_process, 2 + K)
    gathered = gathered[gathered[:, 0] >= 0]  # drop the padding rows
    gathered = gathered[torch.argsort(gathered[:, 0], stable=True)]
    # Keep the first row of each index: each image is counted exactly once even if shards ever overlapped.
    keep = torch.ones(gathered.shape[0], dtype=torch.bool)
    keep[1:] = gathered[1:, 0] != gathered[:-1, 0]
    gathered = gathered[keep]
    if gathered.shape[0] != total:
        raise RuntimeError(
            f"gathered predictions for {gathered.shape[0]} of {total} images across {world} processes"
        )
    return gathered


def _state(accelerator):
    if accelerator is not None:
        return accelerator
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # The launch's processes and device (one process when not launched). ACCELERATE_USE_CPU is read as
    # accelerate's own AcceleratorState reads it: without it a CPU-only multi-process launch is not seen.
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _run(
    encoder: CLIPEncoder,
    task: _Task,
    *,
    classifier: Tensor | None,
    batch_size: int,
    num_workers: int,
    state,
    progress: bool,
    model_name: str,
    return_predictions: bool,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    num_classes = len(task.classnames)
    if classifier is None:
        classifier = zero_shot_classifier(encoder, task.classnames, task.templates, batch_size=batch_size)
    classifier = classifier.to(device=encoder.device, dtype=torch.float32)  # (E, C)
    k = min(TOP_K, num_classes)

    total = len(task.dataset)
    rank, world = state.process_index, state.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and launched > 1:
        # e.g. plain torchrun on a CPU-only machine: accelerate then runs every process on its own.
        warnings.warn(
            f"WORLD_SIZE={launched} but accelerate sees a single process, so every process evaluates all "
            f"{total} images of {task.name!r}; on CPUs launch with ACCELERATE_USE_CPU=1 to shard them",
            stacklevel=3,
        )
    shard = Subset(task.dataset, range(rank, total, world))  # process r: images r, r + W, ...; no padding
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_Collate(encoder.inputs),
    )
    bar = tqdm(
        loader,
        desc=f"zero-shot {task.name}",
        unit="batch",
        disable=not progress or not state.is_main_process,
    )
    rows, seen = [], 0
    for pixels, labels in bar:
        image_emb = encoder.encode_images(pixels)  # (B, E), normalised
        if image_emb.shape[1] != classifier.shape[0]:
            raise ValueError(
                f"the classifier has embedding width {classifier.shape[0]} but the model's images have "
                f"{image_emb.shape[1]}: build it with the same model"
            )
        logits = 100.0 * image_emb @ classifier  # (B, C)
        top = logits.topk(k, dim=1).indices.cpu()  # (B, k)
        index = torch.tensor(shard.indices[seen : seen + len(labels)], dtype=torch.long)  # (B,)
        rows.append(torch.cat([index[:, None], labels[:, None], top], dim=1))  # (B, 2 + k)
        seen += len(labels)
    rows = torch.cat(rows) if rows else torch.empty(0, 2 + k, dtype=torch.long)  # (n_r, 2 + k)
    if world > 1:
        rows = _gather_rows(rows, total, state)  # (N, 2 + k), sorted by index

    metrics = zeroshot_metrics(rows[:, 2:], rows[:, 1], num_classes)
    per_class = metrics.pop("per_class_recall")
    result: dict[str, Any] = {"dataset": task.name, "model": model_name}
    result.update(metrics)
    result["per_class_accuracy"] = dict(zip(_unique_keys(task.classnames), per_class, strict=True))
    result["num_images"] = int(rows.shape[0])
    result["num_classes"] = num_classes
    if return_predictions:
        result["predictions"] = rows[:, 2].tolist()
    return result


def _unique_keys(classnames: list[str]) -> list[str]:
    """Class names as dict keys; a repeated name (ImageNet has two "crane"s) gets its label index appended."""
    repeated = {c for c, n in Counter(classnames).items() if n > 1}
    return [f"{c} [{i}]" if c in repeated else c for i, c in enumerate(classnames)]


def _model_name(model, encoder: CLIPEncoder) -> str:
    return str(model) if isinstance(model, (str, Path)) else encoder.name


def evaluate_zeroshot(
    model,
    dataset,
    data_dir: str | None = None,
    split: str = "test",
    batch_size: int = 256,
    num_workers: int = 0,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    classifier: Tensor | None = None,
    pretrained: str | None = None,
    processor=None,
    accelerator=None,
    progress: bool = True,
    return_predictions: bool = False,
    backend: str = "auto",
) -> dict[str, Any]:
    """Zero-shot classification accuracy of ``model`` on ``dataset`` (CLIP_benchmark's protocol).

    Args:
        model: anything :func:`~mmkd.eval.encoders.load_encoder` takes: a model directory / hub id / open_clip
            name or config (with ``pretrained``), a :class:`~mmkd.teachers.CLIPTeacher`, a live
            ``transformers.CLIPModel`` with its ``processor``, a ``CLIPEncoder``. A spec string is loaded onto
            the accelerator's device; a model object is evaluated on the device it is on (a student prepared
            by the accelerator already is there), in eval mode under ``no_grad``, and put back in the mode it
            was in.
        dataset: a name or path for :func:`mmkd.eval.datasets.load_classification_dataset` (``cifar10``,
            ``cifar100``, ``stl10``, an image folder, a ``save_to_disk`` folder, a hub id), or a dataset of
            ``(PIL image, int label)`` pairs with ``.classnames`` (e.g. a ``ClassificationDataset``).
        data_dir: where a named dataset's files are.
        split: the split of a named dataset.
        batch_size: images (and prompts) encoded at once; one batch of images is decoded at a time.
        num_workers: DataLoader workers decoding and preprocessing images.
        classnames: class names in label order; default: CLIP_benchmark's for CIFAR-10/100 and STL-10, the
            dataset's ``.classnames`` otherwise.
        templates: prompt templates with ``{c}``; default: :func:`default_templates` of the dataset.
        classifier: a ready ``(E, C)`` classifier from :func:`zero_shot_classifier` (no text is encoded then).
        pretrained: open_clip pretrained tag or checkpoint, when ``model`` is an open_clip name.
        processor: the processor of a live transformers ``CLIPModel``.
        accelerator: an ``accelerate.Accelerator`` (or ``PartialState``); default: the current launch's state.
            With several processes, every process must call this function; images are sharded and the
            predictions gathered (see the module docstring), and every process returns the same dict. Each
            process builds the (small) text classifier itself unless ``classifier`` is given.
        progress: show a progress bar (on the main process only).
        return_predictions: add ``"predictions"``, the top-1 class index of every image in dataset order.
        backend: how a string ``model`` is loaded (:func:`~mmkd.eval.encoders.load_encoder`): ``auto``,
            ``open_clip``, ``transformers``, or ``onnxruntime`` / ``onnxruntime-int8`` for a folder written by
            ``mmkd export --format onnx`` (the same protocol, the encoders run by onnxruntime).

    Returns:
        ``{"dataset", "model", "acc1", "acc5" (only with >= 5 classes), "mean_per_class_recall",
        "per_class_accuracy" ({class name: accuracy, None for a class without images}), "num_images",
        "num_classes"}``; accuracies are fractions in ``[0, 1]``.
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("num_workers", num_workers, 0)
    task = _prepare(dataset, data_dir, split, classnames, templates)
    if classifier is not None:
        if not isinstance(classifier, Tensor) or classifier.ndim != 2:
            got = tuple(classifier.shape) if isinstance(classifier, Tensor) else type(classifier).__name__
            raise ValueError(f"classifier must be an (E, C) tensor from zero_shot_classifier, got {got}")
        if classifier.shape[1] != len(task.classnames):
            raise ValueError(
                f"classifier has {classifier.shape[1]} classes but dataset {task.name!r} has "
                f"{len(task.classnames)}: build it from the same class names"
            )
    state = _state(accelerator)
    device = state.device if isinstance(model, (str, Path)) else None
    encoder = load_encoder(
        str(model) if isinstance(model, Path) else model,
        pretrained=pretrained,
        processor=processor,
        backend=backend,
        device=device,
    )
    return _run(
        encoder,
        task,
        classifier=classifier,
        batch_size=batch_size,
        num_workers=num_workers,
        state=state,
        progress=progress,
        model_name=_model_name(model, encoder),
        return_predictions=return_predictions,
    )


if __name__ == "__main__":
    import sys

    from mmkd.cli import run_command
    from mmkd.distributed import shutdown

    code = run_command("zeroshot", sys.argv[1:], prog="python -m mmkd.eval.zeroshot")
    shutdown()  # under torchrun: end the process group cleanly on every rank
    sys.exit(code)
