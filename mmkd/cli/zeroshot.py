"""``mmkd zeroshot``: zero-shot accuracy of a model on named datasets (:mod:`mmkd.eval.zeroshot`)::

    mmkd zeroshot --model ViT-B-32 --pretrained openai --dataset cifar10,cifar100 --data-dir /data --output r.json
    accelerate launch --num_processes 4 -m mmkd.eval.zeroshot --model runs/student --dataset stl10 --data-dir /data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mmkd.cli import CommandError, one_line
from mmkd.eval.encoders import ENCODER_BACKENDS, load_encoder
from mmkd.eval.zeroshot import _check_templates, _prepare, _run, _state


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Zero-shot classification accuracy of a CLIP model with CLIP_benchmark's protocol (class names, "
            "prompt templates, acc@1, acc@5 and mean per-class recall). Prints a table in percent and can "
            "write the full results, per-class accuracies included, as JSON (fractions in [0, 1])."
        ),
    )
    p.add_argument(
        "--model",
        required=True,
        help="model to evaluate: a transformers CLIPModel directory or hub id (mmkd students included), an "
        "open_clip model name (with --pretrained), 'hf-hub:...', or an open_clip *.json config",
    )
    p.add_argument(
        "--pretrained", default=None, help="open_clip pretrained tag or checkpoint file for --model"
    )
    p.add_argument(
        "--dataset",
        action="append",
        required=True,
        help="dataset(s) to evaluate: cifar10, cifar100, stl10 (files in --data-dir), a folder with one "
        "sub-folder per class, a save_to_disk folder, or a hub id; repeat the option or separate with commas",
    )
    p.add_argument("--data-dir", default=None, help="folder holding the named datasets' files")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument(
        "--batch-size", type=int, default=256, help="images and prompts encoded at once (default: 256)"
    )
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (default: 0)")
    p.add_argument(
        "--templates",
        default=None,
        metavar="FILE.json",
        help="prompt templates with '{c}' for the class name: a JSON list (used for every dataset) or an "
        "object {dataset: [templates]} with an optional 'default' key; default: CLIP_benchmark's templates",
    )
    p.add_argument(
        "--output", default=None, metavar="results.json", help="write the results as JSON to this file"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--backend", choices=ENCODER_BACKENDS, default="auto",
                   help="how MODEL is loaded: auto, open_clip, transformers, or onnxruntime / onnxruntime-int8 for a "
                   "folder written by `mmkd export --format onnx` (default: auto)")
    return p


def _load_template_file(path: str) -> list[str] | dict[str, list[str]]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"templates file {path!r} does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"templates file {path!r} is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        return {str(k): _check_templates(v, f"{path!r}[{k!r}]") for k, v in data.items()}
    return _check_templates(data, f"templates file {path!r}")


def _templates_for(spec: list[str] | dict[str, list[str]] | None, name: str) -> list[str] | None:
    if spec is None or isinstance(spec, list):
        return spec
    return spec.get(name, spec.get("default"))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(results: list[dict[str, Any]]) -> str:
    """Results as an aligned text table, accuracies in percent with 2 decimals."""
    header = ("dataset", "acc@1", "acc@5", "mean per-class recall", "images")
    rows = [
        (
            r["dataset"],
            _fmt(r["acc1"]),
            _fmt(r.get("acc5")),
            _fmt(r["mean_per_class_recall"]),
            str(r["num_images"]),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace, prog: str) -> int:
    """Evaluate and print the table; bad input raises :class:`~mmkd.cli.CommandError` before the model loads."""
    names = [n.strip() for item in args.dataset for n in item.split(",") if n.strip()]
    if not names:
        raise CommandError("--dataset is empty: name at least one dataset")
    for option, value, minimum in (
        ("--batch-size", args.batch_size, 1),
        ("--num-workers", args.num_workers, 0),
    ):
        if value < minimum:
            raise CommandError(f"{option} must be >= {minimum}, got {value}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise CommandError(f"--data-dir {args.data_dir!r} is not a directory")
    try:
        template_spec = _load_template_file(args.templates) if args.templates else None
    except (OSError, ValueError) as exc:
        raise CommandError(one_line(exc)) from None

    # Every dataset is loaded (and every name checked) before the model, the expensive part.
    tasks = []
    for name in names:
        try:
            tasks.append(_prepare(name, args.data_dir, args.split, None, _templates_for(template_spec, name)))
        except Exception as exc:  # any loader failure is bad input here: one line, no traceback
            raise CommandError(f"cannot load dataset {name!r}: {one_line(exc)}") from None

    state = _state(None)
    try:
        encoder = load_encoder(args.model, pretrained=args.pretrained, backend=args.backend, device=state.device)
    except Exception as exc:  # same for the model spec
        raise CommandError(f"cannot load model {args.model!r}: {one_line(exc)}") from None

    results = [
        _run(
            encoder,
            task,
            classifier=None,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            state=state,
            progress=not args.no_progress,
            model_name=args.model,
            return_predictions=False,
        )
        for task in tasks
    ]
    if state.is_main_process:
        print(format_table(results))
        if args.output:
            out = Path(args.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            payload = {"model": args.model, "pretrained": args.pretrained, "results": results}
            out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
            print(f"results written to {out}")
    return 0
