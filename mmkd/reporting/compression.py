"""Compression report: teacher, students, int8 copies and pruned teachers, side by side.

What distillation buys, measured the way a deployment sees it, for the teacher (as its transformers twin, so every
row runs the same ``CLIPModel`` code), the student and a dynamic-int8 copy of the student: parameters; bytes on
disk (``save_pretrained`` safetensors, or ``torch.save(state_dict)`` for the int8 copy, whose packed weights
safetensors cannot hold); image and text encoding throughput on this machine (:func:`compare_throughput`); and
optionally zero-shot acc@1 / acc@5 (:func:`mmkd.eval.zeroshot.evaluate_zeroshot`). As in the research notes'
distillation study: quantization keeps accuracy and cuts the Linear weights to a quarter of their bytes;
distillation cuts depth, and with it compute. The command line is ``mmkd report`` (:mod:`mmkd.cli.report`)::

    python -m mmkd.report --teacher out/offline/teacher --student out/offline/distilled \\
        --dataset fashion_mnist --plot report.png --json report.json --markdown report.md

Quantization is ``torch.ao.quantization.quantize_dynamic`` on the ``nn.Linear`` layers; torch 2.14 marks it
deprecated (its successor is torchao's ``quantize_``, a package mmkd does not depend on), it still works, and its
deprecation warnings are silenced here.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmkd.checks import HUB_ID
from mmkd.reporting.hardware import machine_info
from mmkd.reporting.pruning import (
    PRUNING_HOW,
    PRUNING_METHODS,
    magnitude_prune,
    nonzero_parameters,
    prunable_sparsity,
    sparse_size,
    structured_prune,
)
from mmkd.reporting.tables import fmt, markdown_table, pct
from mmkd.reporting.throughput import check_counts, compare_throughput, measure_throughput
from mmkd.reporting.timing import time_summary

__all__ = [
    "ONNX_HOW", "QUANTIZATION", "compare_throughput", "compression_report", "format_report", "measure_throughput",
    "quantize_int8", "size_on_disk",
]  # fmt: skip

QUANTIZATION = "torch.ao.quantization.quantize_dynamic({nn.Linear}, dtype=torch.qint8)"
#: how the onnx rows are made and run (``compression_report(onnx=True)``)
ONNX_HOW = "torch.onnx.export(dynamo=True) encoders run by onnxruntime's CPUExecutionProvider"
ONNX_INT8_HOW = "onnxruntime.quantization.quantize_dynamic(weight_type=QInt8) of the exported graphs"
#: dataset names the report knows besides paths and Hub ids; "none" skips the accuracy columns.
NAMED_DATASETS = ("none", "fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder")
#: a slowest / fastest timed batch ratio above this flags a disturbed throughput measurement in the Markdown
DISTURBED_SPREAD = 1.2
#: what a report row copies from :func:`compare_throughput`'s figures of its model
SPEED_KEYS = ("image_size", "text_length", "image_per_s", "text_per_s", "image_seconds", "text_seconds")


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` dynamically quantized to int8 (weights int8, activations
    quantized per batch at run time); ``model`` itself is left alone.

    Dynamic quantization needs no calibration data, which is why it is the baseline compression the research notes
    compare distillation with. Embeddings, LayerNorms and the attention matmuls stay float32.
    """
    from torch.ao.quantization import quantize_dynamic

    clone = copy.deepcopy(model).cpu().float().eval()
    with warnings.catch_warnings():
        # torch 2.14 warns that torch.ao.quantization and quantize_per_tensor are deprecated; both still work
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated", category=UserWarning)
        return quantize_dynamic(clone, {nn.Linear}, dtype=torch.qint8)


def _is_quantized(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


def size_on_disk(model: nn.Module) -> tuple[int, str]:
    """(bytes, format) of ``model`` saved to a temporary folder, the way it would be shipped.

    Float ``transformers`` models: ``save_pretrained`` (safetensors + config.json, every file counted). Quantized
    models: ``torch.save(model.state_dict())`` -- their packed int8 weights are not plain tensors. An ONNX export
    (:class:`~mmkd.interop.to_onnx.ONNXCLIP`): its two encoder files, as written.
    """
    from mmkd.interop.to_onnx import ONNXCLIP

    if isinstance(model, ONNXCLIP):
        return model.size_bytes(), "ONNX (image + text encoder files)"
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar is noise in a report
    try:
        with tempfile.TemporaryDirectory(prefix="mmkd-size-") as tmp:
            if _is_quantized(model) or not hasattr(model, "save_pretrained"):
                torch.save(model.state_dict(), Path(tmp) / "state_dict.pt")
                how = "torch.save(state_dict)"
            else:
                model.save_pretrained(tmp)
                how = "save_pretrained (safetensors)"
            return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()), how
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _fashion_mnist_templates() -> list[str]:
    from mmkd.data.fashion_mnist import DEFAULT_TEMPLATES

    return [t.replace("{}", "{c}") for t in DEFAULT_TEMPLATES]


def load_report_dataset(
    dataset: Any, data_dir: str | None = None, max_examples: int | None = None, seed: int = 0
) -> tuple[Any, list[str] | None]:
    """(dataset, templates or None for evaluate_zeroshot's defaults) for a name, a path or a dataset object.

    ``fashion_mnist``: the offline test split (class-balanced ``max_examples``) with mmkd's Fashion-MNIST prompt
    templates. Other names and paths: :func:`mmkd.eval.datasets.load_classification_dataset`, and a seeded random
    subset of ``max_examples`` images (a first-N slice of a class-sorted folder would be one class).
    """
    if max_examples is not None and (isinstance(max_examples, bool) or max_examples < 1):
        raise ValueError(f"max_examples must be >= 1, got {max_examples!r}")
    if isinstance(dataset, (str, Path)) and str(dataset).lower() == "fashion_mnist":
        from mmkd.data.fashion_mnist import fashion_mnist_classification

        ds = fashion_mnist_classification("test", data_dir=data_dir, max_examples=max_examples, seed=seed)
        return ds, _fashion_mnist_templates()
    if isinstance(dataset, (str, Path)):
        from mmkd.eval.datasets import DATASETS, load_classification_dataset

        spec = str(dataset)
        if data_dir is not None and not Path(data_dir).is_dir():
            raise FileNotFoundError(f"data_dir {data_dir!r} is not a directory")
        is_path = spec.lower() not in (*DATASETS, "imagefolder") and Path(spec).exists()
        ds = load_classification_dataset(spec, data_dir=None if is_path else data_dir, split="test")
    else:
        ds = dataset
    if len(ds) == 0:
        raise ValueError(f"dataset {getattr(ds, 'name', dataset)!r} has no images")
    if max_examples is not None and max_examples < len(ds):
        gen = torch.Generator().manual_seed(seed)
        subset = torch.utils.data.Subset(ds, sorted(torch.randperm(len(ds), generator=gen)[:max_examples].tolist()))
        # evaluate_zeroshot reads its default class names and templates from these
        subset.name, subset.classnames = getattr(ds, "name", None), getattr(ds, "classnames", None)
        ds = subset
    return ds, None


def _check_student_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"student directory {str(path)!r} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"student {str(path)!r} is not a save_pretrained folder (no config.json)")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {exc}") from None
    if model_type != "clip":
        raise ValueError(f"student {str(path)!r} has model_type {model_type!r}, not 'clip' (a CLIPModel)")


def check_dataset_name(dataset: Any, data_dir: str | None) -> None:
    """Cheap checks of a dataset spec, so a typo fails before anything is loaded."""
    if not isinstance(dataset, (str, Path)) or data_dir is not None:
        return  # with data_dir, any other name just labels the folder it reads
    spec = str(dataset)
    if spec.lower() in NAMED_DATASETS or Path(spec).exists():
        return
    if not HUB_ID.fullmatch(spec):
        raise ValueError(
            f"unknown dataset {spec!r}: use none, fashion_mnist, cifar10, cifar100, stl10 (--data-dir with the "
            "official files), an image folder path, or a Hub id owner/name"
        )


def _teacher_model(teacher: Any, teacher_pretrained: str | None, teacher_processor: Any) -> tuple[Any, Any, str]:
    """(transformers CLIPModel, CLIPProcessor, name) of a teacher spec, CLIPTeacher or CLIPModel."""
    from transformers import CLIPModel

    from mmkd.teachers import CLIPTeacher, load_transformers_clip

    if isinstance(teacher, CLIPModel):
        if teacher_processor is None:
            raise ValueError("a CLIPModel teacher needs its processor: compression_report(..., teacher_processor=)")
        return teacher, teacher_processor, getattr(teacher.config, "_name_or_path", "") or "teacher"
    if isinstance(teacher, (str, Path)):
        model, processor, name = load_transformers_clip(str(teacher), pretrained=teacher_pretrained)
    elif isinstance(teacher, CLIPTeacher):
        model, processor, name = teacher.to_transformers(), teacher.transformers_processor(), teacher.name
    else:
        raise TypeError(f"teacher must be a spec string, a CLIPTeacher or a CLIPModel, got {type(teacher).__name__}")
    return _frozen(model), processor, name


def _student_model(student: Any, student_processor: Any) -> tuple[Any, Any, str]:
    """(CLIPModel, CLIPProcessor, name) of a student folder (with its processor files) or a CLIPModel."""
    from transformers import CLIPModel

    from mmkd.teachers import load_transformers_clip

    if isinstance(student, CLIPModel):
        if student_processor is None:
            raise ValueError("a CLIPModel student needs its processor: compression_report(..., student_processor=)")
        return student, student_processor, getattr(student.config, "_name_or_path", "") or "student"
    _check_student_dir(Path(student))
    model, processor, _ = load_transformers_clip(str(student), backend="transformers")
    return _frozen(model), student_processor if student_processor is not None else processor, str(student)


def _frozen(model: nn.Module) -> nn.Module:
    """A loaded model as it is measured: float32, eval mode, no gradients."""
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _layers(model: nn.Module) -> str:
    cfg = model.config
    return f"{cfg.vision_config.num_hidden_layers}+{cfg.text_config.num_hidden_layers}"


def _widths(model: nn.Module) -> str:
    cfg = model.config
    return f"{cfg.vision_config.hidden_size}/{cfg.text_config.hidden_size}"


def _student_labels(students: list[Any], taken: set[str] = frozenset()) -> list[str]:
    """``student`` for one student; each folder's name for several -- made unique among themselves and against the
    ``taken`` labels of the teacher's rows (and their int8 names)."""
    if len(students) == 1:
        return ["student"]
    labels: list[str] = []
    for i, spec in enumerate(students):
        label = Path(spec).name if isinstance(spec, (str, Path)) else f"student {i + 1}"
        clash = label in labels or any(label + x in taken for x in ("", *VARIANT_SUFFIXES)) or label == "teacher"
        labels.append(f"{label} ({i + 1})" if clash else label)
    return labels


def compression_report(
    teacher: Any, student: Any, dataset: Any = None, *, teacher_pretrained: str | None = None,
    teacher_processor: Any = None, student_processor: Any = None, data_dir: str | None = None,
    max_examples: int | None = None, batch_size: int = 32, repeats: int = 5, warmup: int = 1,
    text_length: int | None = None, eval_batch_size: int = 256, quantize: bool = True, onnx: bool = False,
    prune: Sequence[tuple[str, float]] = (), progress: bool = False, log=None,
) -> dict[str, Any]:  # fmt: skip
    """Measure the teacher, its students, their int8 copies, their ONNX exports in onnxruntime and pruned copies
    of the teacher; returns a JSON-able dict (see :func:`format_report`).

    Args:
        teacher: anything :func:`mmkd.teachers.load_transformers_clip` takes (open_clip name / json / checkpoint,
            transformers folder or hub id), a ``CLIPTeacher``, or a ``CLIPModel`` with ``teacher_processor``. It is
            measured as its transformers twin (``to_transformers()``), so all rows run the same code.
        student: a ``save_pretrained`` folder with its processor files (loaded the same way; ``student_processor``
            replaces the folder's), or a ``CLIPModel`` with ``student_processor``; or a list of folders (rows named
            by folder).
        dataset: ``None`` / ``"none"`` (no accuracy), ``"fashion_mnist"`` (offline test split, mmkd's templates),
            a name or path for :func:`mmkd.eval.datasets.load_classification_dataset`, or a dataset object of
            ``(PIL image, label)`` pairs with ``.classnames``.
        teacher_pretrained: open_clip pretrained tag or checkpoint for a spec-string teacher.
        data_dir, max_examples: where a named dataset's files are; evaluate on at most this many images.
        batch_size, repeats, warmup, text_length: throughput settings (:func:`measure_throughput`).
        eval_batch_size: images / prompts per batch in the accuracy pass (does not change the numbers).
        quantize: add an int8 row for the teacher and for each student (and, with ``onnx``, an onnxruntime int8
            row: :func:`mmkd.interop.to_onnx.export_onnx` with ``int8=True``).
        onnx: add an onnxruntime row for the teacher and for each student: the encoders exported by
            :func:`mmkd.interop.to_onnx.export_onnx` (checked against the model) to a temporary folder, timed on
            the same inputs and evaluated with ``backend="onnxruntime"``; needs the ``onnx`` extra.
        prune: ``(method, level)`` pairs (:func:`mmkd.reporting.pruning.parse_prune_spec`): a pruned copy of the
            teacher per pair, without retraining -- ``magnitude`` (unstructured, global) or ``structured``.
        progress: progress bars in the accuracy pass.
        log: called with a line per stage (e.g. ``print``), or None.

    Every input is checked (student folder, dataset) and the dataset is loaded before any model is.
    """
    say = log or (lambda _msg: None)
    if onnx:
        from mmkd.interop.to_onnx import require_onnx

        require_onnx()  # MissingONNXError, before anything loads
    check_counts(
        batch_size=(batch_size, 1), repeats=(repeats, 1), warmup=(warmup, 0), eval_batch_size=(eval_batch_size, 1)
    )
    students = list(student) if isinstance(student, (list, tuple)) else [student]
    if not students:
        raise ValueError("no student to report on")
    for spec in students:
        if isinstance(spec, (str, Path)):
            _check_student_dir(Path(spec))
    prune_labels = [f"teacher {method} {level:.1%}".replace(".0%", "%") for method, level in prune]
    for (method, level), label in zip(prune, prune_labels, strict=True):
        if method not in PRUNING_METHODS or not 0 < level < 1:
            raise ValueError(f"prune=({method!r}, {level}): method one of {', '.join(PRUNING_METHODS)}, level in (0, 1)")
        if prune_labels.count(label) > 1:
            raise ValueError(f"prune: {method} {level} is asked twice (or rounds to the same row, {label!r})")
    if isinstance(teacher, (str, Path)):
        from mmkd.teachers import resolve_backend

        resolve_backend(str(teacher))  # a teacher folder of neither kind fails here, before anything loads
    if isinstance(dataset, (str, Path)) and str(dataset).lower() == "none":
        dataset = None
    task = None
    if dataset is not None:
        check_dataset_name(dataset, data_dir)
        say(f"loading dataset {dataset}")
        task = load_report_dataset(dataset, data_dir=data_dir, max_examples=max_examples)

    with tempfile.TemporaryDirectory(prefix="mmkd-report-onnx-") as exports:
        return _measure(teacher, teacher_pretrained, teacher_processor, students, student_processor, dataset, task,
                        prune, prune_labels, Path(exports) if onnx else None, quantize=quantize, batch_size=batch_size,
                        repeats=repeats, warmup=warmup, text_length=text_length, eval_batch_size=eval_batch_size,
                        progress=progress, say=say)


def _variants(label: str, name: str, model: nn.Module, proc: Any, quantize: bool, exports: Path | None,
              say) -> list[tuple]:
    """The rows derived from one model: its torch int8 copy (``quantize``) and, with ``exports`` (a folder), its
    ONNX export in onnxruntime and that export's int8 copy; ``(label, name, model, processor, technique, source
    label, model whose Parameters count)`` each."""
    rows = []
    if quantize:
        say(f"quantizing {label} to int8")
        rows.append((f"{label} int8", f"{name} (int8)", quantize_int8(model), proc, "int8", label, model))
    if exports is not None:
        from mmkd.interop.to_onnx import ONNXCLIP, export_onnx

        say(f"exporting {label} to ONNX" + (" (and onnxruntime int8)" if quantize else ""))
        folder = exports / f"{len(list(exports.iterdir()))}"
        export_onnx(model, folder, processor=proc, int8=quantize, measure=False)  # the report measures
        # spinning off: its idle threads would starve the torch row timed next (see ONNXCLIP)
        rows.append((f"{label} onnx", f"{name} (onnxruntime)", ONNXCLIP(folder, config=model.config, spinning=False),
                     proc, "onnx", label, model))
        if quantize:
            rows.append((f"{label} onnx int8", f"{name} (onnxruntime int8)",
                         ONNXCLIP(folder, int8=True, config=model.config, spinning=False), proc, "onnx int8", label,
                         model))
    return rows


#: the labels :func:`_variants` gives the rows derived from a model labelled ``x``: x int8, x onnx, x onnx int8
VARIANT_SUFFIXES = (" int8", " onnx", " onnx int8")


def _measure(teacher, teacher_pretrained, teacher_processor, students, student_processor, dataset, task, prune,
             prune_labels, exports, *, quantize, batch_size, repeats, warmup, text_length, eval_batch_size, progress,
             say) -> dict[str, Any]:
    """:func:`compression_report` once its inputs are checked: load, derive, time, size and evaluate each row."""
    from mmkd.interop.to_onnx import ONNXCLIP

    say(f"loading teacher {teacher}")
    t_model, t_proc, t_name = _teacher_model(teacher, teacher_pretrained, teacher_processor)
    # (label, name, model, processor, technique, source label, model whose Parameters count)
    models = [("teacher", t_name, t_model, t_proc, "teacher", None, t_model)]
    models += _variants("teacher", t_name, t_model, t_proc, quantize, exports, say)
    for (method, level), label in zip(prune, prune_labels, strict=True):
        say(f"pruning the teacher: {method} {level:.1%}")
        pruned = magnitude_prune(t_model, level) if method == "magnitude" else structured_prune(t_model, level)[0]
        models.append((label, f"{t_name} ({method} pruning {level:.0%})", _frozen(pruned), t_proc,
                       f"{method} pruning", "teacher", pruned))
    labels = _student_labels(students, taken={m[0] + x for m in models for x in ("", *VARIANT_SUFFIXES)})
    s_names = []
    for spec, label in zip(students, labels, strict=True):
        say(f"loading student {spec}")
        s_model, s_proc, s_name = _student_model(spec, student_processor)
        s_names.append(s_name)
        models.append((label, s_name, s_model, s_proc, "student", "teacher", s_model))
        models += _variants(label, s_name, s_model, s_proc, quantize, exports, say)

    say(f"throughput: {repeats} interleaved repeats of batch {batch_size} per encoder")
    speeds = compare_throughput({m[0]: m[2] for m in models}, batch_size=batch_size, repeats=repeats,
                                warmup=warmup, text_length=text_length)
    rows = []
    for label, name, model, proc, technique, source, counted in models:
        say(f"{label}: size on disk")
        size_bytes, size_format = size_on_disk(model)
        speed = speeds[label]
        quantized = _is_quantized(model)
        row: dict[str, Any] = {
            "model": label,
            "name": name,
            "technique": technique,
            "source": source,
            "layers": _layers(model),
            "widths": _widths(model),
            # an int8 copy has the same weights as its source, packed; its Linear weights are no longer Parameters
            "parameters": sum(p.numel() for p in counted.parameters()),
            "nonzero_parameters": nonzero_parameters(counted),
            "linear_sparsity": prunable_sparsity(counted),
            "size_bytes": size_bytes,
            "size_mb": size_bytes / 1e6,
            "size_format": size_format,
            # the Linear weights stored as CSR: what the zeros of a magnitude-pruned model could save (n/a for int8)
            "sparse_size_mb": None if quantized or isinstance(model, ONNXCLIP) else sparse_size(model) / 1e6,
            **{key: speed[key] for key in SPEED_KEYS},
            # slowest / fastest timed batch: near 1 on a quiet machine, well above it when something else ran
            "image_spread": time_summary(speed["image_seconds"])["spread"],
            "text_spread": time_summary(speed["text_seconds"])["spread"],
            "acc1": None,
            "acc5": None,
        }
        if task is not None:
            from mmkd.eval.zeroshot import evaluate_zeroshot

            say(f"{label}: zero-shot accuracy")
            ds, templates = task
            if isinstance(model, ONNXCLIP):  # the export's folder, through onnxruntime
                result = evaluate_zeroshot(str(model.folder), ds, templates=templates, batch_size=eval_batch_size,
                                           progress=progress, backend="onnxruntime-int8" if model.int8 else "onnxruntime")
            else:
                result = evaluate_zeroshot(model, ds, templates=templates, processor=proc, batch_size=eval_batch_size,
                                           progress=progress)
            row["acc1"], row["acc5"] = result["acc1"], result.get("acc5")
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["image_speedup"] = row["image_per_s"] / base["image_per_s"]
        row["text_speedup"] = row["text_per_s"] / base["text_per_s"]

    dataset_info = None
    if task is not None:
        ds, templates = task
        dataset_info = {
            "name": str(dataset) if isinstance(dataset, (str, Path)) else getattr(ds, "name", type(ds).__name__),
            "num_images": len(ds),
            "num_classes": len(getattr(ds, "classnames", None) or []),
            "templates": "fashion_mnist (mmkd)" if templates is not None else "evaluate_zeroshot defaults",
        }
    return {
        "teacher": t_name,
        "teacher_pretrained": teacher_pretrained,
        "student": s_names[0] if len(s_names) == 1 else s_names,
        "dataset": dataset_info,
        "settings": {
            "batch_size": batch_size,
            "repeats": repeats,
            "warmup": warmup,
            "interleaved": True,
            "text_length": rows[0]["text_length"],
            "quantization": QUANTIZATION if quantize else None,
            "onnx": ONNX_HOW + (f"; int8: {ONNX_INT8_HOW}" if quantize else "") if exports is not None else None,
            "pruning": [{"method": m, "level": lv, "how": PRUNING_HOW[m]} for m, lv in prune],
        },
        # other processes' CPU use slows every row alike (the models are interleaved): the CPU share tells
        # whether the absolute rates are this machine's or a shared machine's
        "machine": {**machine_info(), "cpu_share": speeds["teacher"]["cpu_share"]},
        "rows": rows,
    }


TABLE_HEADER = (
    "model", "layers (vision+text)", "widths (vision/text)", "parameters", "non-zero parameters",
    "size on disk (MB)", "sparse size (MB)", "image enc/s", "text enc/s", "image speed-up vs teacher",
    "text speed-up vs teacher", "acc@1 (%)", "acc@5 (%)",
)  # fmt: skip


def table_cells(row: dict[str, Any]) -> list[str]:
    """A row of the Markdown table, formatted from the report dict's numbers."""
    return [
        row["model"],
        row["layers"],
        row["widths"],
        fmt(row["parameters"], ","),
        fmt(row["nonzero_parameters"], ","),
        fmt(row["size_mb"]),
        fmt(row["sparse_size_mb"]),
        fmt(row["image_per_s"], ".1f"),
        fmt(row["text_per_s"], ".1f"),
        f"{fmt(row['image_speedup'])}×",
        f"{fmt(row['text_speedup'])}×",
        pct(row["acc1"]),
        pct(row["acc5"]),
    ]


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown: what was measured where, then the table (one row per model)."""
    s, m, ds = report["settings"], report["machine"], report["dataset"]
    teacher = report["teacher"] + (f" ({report['teacher_pretrained']})" if report.get("teacher_pretrained") else "")
    lines = [
        f"Teacher: `{teacher}` (measured as its transformers twin); student: `{report['student']}`.",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
        + ".",
        f"Throughput: synthetic inputs, batch {s['batch_size']}, texts of {s['text_length']} tokens, "
        f"median of {s['repeats']} timed batches (models interleaved) after {s['warmup']} warm-up. Size: bytes written to disk "
        "(float models: save_pretrained safetensors; int8: torch.save(state_dict)), MB = 10^6 bytes.",
    ]
    spread = max(max(r["image_spread"], r["text_spread"]) for r in report["rows"])
    lines.append(
        f"Timing spread (slowest / fastest timed batch of an encoder): up to {spread:.2f}×"
        + (f" -- above {DISTURBED_SPREAD}×, the machine was busy; rerun for clean figures." if spread > DISTURBED_SPREAD
           else ".")
    )
    lines.append(
        f"CPU share during the timing: {m['cpu_share']:.2f} (CPU time / (wall time x {m['torch_threads']} threads); "
        "near 1 on an otherwise idle machine, lower when other processes shared the cores, which slows every row "
        "alike)."
    )
    if ds is not None:
        lines.append(
            f"Zero-shot accuracy: {ds['name']}, {ds['num_images']:,} images, {ds['num_classes']} classes, "
            f"templates: {ds['templates']}."
        )
    else:
        lines.append("Zero-shot accuracy: not measured (no dataset).")
    if s.get("quantization"):
        lines.append(f"int8: `{s['quantization']}` on a copy of the teacher and of each student.")
    if s.get("onnx"):
        lines.append(f"onnx: {s['onnx']} (size: the two .onnx files).")
    for p in s.get("pruning", []):
        lines.append(f"{p['method']} pruning {p['level']:.0%} of the teacher, without retraining: {p['how']}.")
    if any(p["method"] == "magnitude" for p in s.get("pruning", [])):
        pruned = [r for r in report["rows"] if r["technique"] == "magnitude pruning"]
        lines.append(
            "Unstructured zeros do not speed up dense kernels or shrink a dense file: the magnitude-pruned rows keep "
            "the teacher's size on disk and run at "
            + ", ".join(f"{r['image_speedup']:.2f}×" for r in pruned)
            + " its image rate; only a sparse format (the sparse-size column: Linear weights as CSR) would store "
            "less."
        )
    lines += ["", markdown_table(TABLE_HEADER, (table_cells(row) for row in report["rows"]))]
    return "\n".join(lines) + "\n"


