"""``mmkd report``: the compression report (:mod:`mmkd.reporting.compression`)::

    mmkd report --teacher out/offline/teacher --student out/offline/distilled --dataset fashion_mnist \\
        --plot report.png --json report.json --markdown report.md
    mmkd report --teacher out/offline/teacher --student out/offline/distilled --student out/narrow \\
        --prune magnitude:0.3,0.5,0.7 --prune structured:0.5 --dataset fashion_mnist --plot report.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmkd.cli import CommandError
from mmkd.reporting.compression import compression_report, format_report
from mmkd.reporting.plots import compression_plot
from mmkd.reporting.pruning import parse_prune_spec


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Compression report: parameters, size on disk, image/text encoding throughput and zero-shot "
        "accuracy of a CLIP teacher, its students, their int8 copies and pruned copies of the teacher.",
    )
    p.add_argument("--teacher", required=True, help="teacher: open_clip name / *.json / checkpoint, or a "
                   "transformers CLIPModel folder or hub id (anything mmkd.teachers.load_teacher takes)")
    p.add_argument("--teacher-pretrained", default=None, help="open_clip pretrained tag or checkpoint for --teacher")
    p.add_argument("--student", required=True, action="append", help="a student's save_pretrained folder; repeat "
                   "for several (rows named by folder)")
    p.add_argument("--prune", action="append", default=[], metavar="METHOD:LEVELS", help="prune copies of the "
                   "teacher without retraining: magnitude:0.3,0.5 (unstructured, global) or structured:0.5 "
                   "(channels and neurons); repeatable")
    p.add_argument("--dataset", default="none", help="none (skip accuracy), fashion_mnist, cifar10, cifar100, "
                   "stl10, an image folder, or a Hub id (default: none)")
    p.add_argument("--data-dir", default=None, help="folder holding the named dataset's files")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate on at most this many images")
    p.add_argument("--batch-size", type=int, default=32, help="throughput batch size (default: 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per encoder; the median is reported "
                   "(default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up batches per encoder (default: 1)")
    p.add_argument("--text-length", type=int, default=None, help="tokens per synthetic text (default: the "
                   "context length)")
    p.add_argument("--eval-batch-size", type=int, default=256, help="batch size of the accuracy pass")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 rows")
    p.add_argument("--onnx", action="store_true", help="add onnxruntime rows (the ONNX export of each model, "
                   "and its int8 copy unless --no-int8); needs pip install 'mmkd[onnx]'")
    p.add_argument("--plot", default=None, metavar="report.png", help="write the accuracy-vs-size plot here")
    p.add_argument("--json", default=None, metavar="report.json", help="write the report dict as JSON here")
    p.add_argument("--markdown", default=None, metavar="report.md", help="write the Markdown table here")
    p.add_argument("--no-progress", action="store_true", help="hide progress messages and bars")
    return p


def run(args: argparse.Namespace, prog: str) -> int:
    """Measure and print the report; bad input raises before any model is loaded."""
    for option, value in (("--batch-size", args.batch_size), ("--repeats", args.repeats),
                          ("--eval-batch-size", args.eval_batch_size)):
        if value < 1:
            raise CommandError(f"{option} must be >= 1, got {value}")
    if args.warmup < 0:
        raise CommandError(f"--warmup must be >= 0, got {args.warmup}")
    if args.max_examples is not None and args.max_examples < 1:
        raise CommandError(f"--max-examples must be >= 1, got {args.max_examples}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise CommandError(f"--data-dir {args.data_dir!r} is not a directory")
    for option, value in (("--plot", args.plot), ("--json", args.json), ("--markdown", args.markdown)):
        if value is not None and Path(value).is_dir():
            raise CommandError(f"{option} {value!r} is a directory, not a file name")

    prune = []
    for spec in args.prune:
        try:
            prune += parse_prune_spec(spec)
        except ValueError as err:
            raise CommandError(str(err)) from None

    def log(msg: str) -> None:
        if not args.no_progress:
            print(f"[{prog}] {msg}", file=sys.stderr, flush=True)

    if args.onnx:
        from mmkd.interop.to_onnx import MissingONNXError, require_onnx

        try:
            require_onnx()
        except MissingONNXError as err:
            raise CommandError(str(err)) from None
    report = compression_report(
        args.teacher,
        args.student if len(args.student) > 1 else args.student[0],
        args.dataset,
        teacher_pretrained=args.teacher_pretrained,
        data_dir=args.data_dir,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        text_length=args.text_length,
        eval_batch_size=args.eval_batch_size,
        quantize=not args.no_int8,
        onnx=args.onnx,
        prune=prune,
        progress=not args.no_progress,
        log=log,
    )

    text = format_report(report)
    print(text, end="")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text, encoding="utf-8")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        compression_plot(report, args.plot)
    return 0
