"""Deployment speed: torch fp32, torch dynamic int8, onnxruntime fp32 and onnxruntime int8, side by side in one run.

For each group of models -- the teacher and its students -- and each batch size, one compression report
(:func:`mmkd.reporting.compression.compression_report` with ``onnx=True``) measures every model four ways on the
same synthetic inputs, interleaved (so a passing load on the machine slows all rows alike): the ``CLIPModel`` in
torch fp32, its ``torch.ao`` dynamic-int8 copy, its ONNX export (``mmkd export --format onnx``, checked against the
model) in onnxruntime, and that export's onnxruntime dynamic-int8 copy. Images/s and captions/s (captions of the
full 77-token context, what open_clip always runs; the ONNX text graph would also take shorter ones), size on disk,
and zero-shot acc@1 on Fashion-MNIST's 10,000 test images for the trained group.

Groups:

* ``offline`` (trained; accuracy measured): the demo's teacher (``make demo``: 6+6 layers, width 256), its distilled
  half-depth student (3+3) and the narrow width-96 student of ``make study`` when ``out/study/narrow`` exists.
* ``vit-b32`` (random weights: compute only, accuracy n/a): open_clip's ViT-B-32 as the teacher, its half-depth
  student (6+6) and a TinyCLIP-like 6+6 student of widths 512 / 256 (issue 15's shapes).

    python benchmarks/deploy_speed.py --output /tmp/deploy.json --markdown /tmp/deploy.md
    python benchmarks/deploy_speed.py --groups offline --batch-sizes 1 32 --repeats 7

Accuracy does not depend on the timing batch, so it is measured in the run of the largest batch only. For the
trained group the script also counts the test images whose top-1 class differs from the torch fp32 model's, per
backend (``--no-agreement`` skips it). Needs the ``onnx`` extra.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from mmkd.reporting.compression import compression_report
from mmkd.reporting.hardware import machine_info

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"": "torch fp32", " int8": "torch int8", " onnx": "onnxruntime fp32", " onnx int8": "onnxruntime int8"}


def _backend(row: dict) -> tuple[str, str]:
    """(the model a row was derived from, its backend) from the report's row label."""
    label = row["model"]
    for suffix in sorted(BACKENDS, key=len, reverse=True):
        if suffix and label.endswith(suffix):
            return label[: -len(suffix)], BACKENDS[suffix]
    return label, BACKENDS[""]


def vit_b32_students(workdir: Path) -> list[str]:
    """Save the half-depth and the TinyCLIP-like narrow students of a random ViT-B-32 (with its processor)."""
    from mmkd.students import build_student
    from mmkd.teachers import load_transformers_clip

    torch.manual_seed(0)
    teacher, processor, _ = load_transformers_clip("ViT-B-32")
    shapes = {"half-6+6": {}, "narrow-6+6-w512-256": {"vision_width": 512, "text_width": 256}}
    folders = []
    for name, shape in shapes.items():
        student, _ = build_student(teacher, **shape)
        folder = workdir / name
        student.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders.append(str(folder))
    return folders


def prediction_agreement(folder: str, dataset: str, max_examples: int | None, workdir: Path) -> dict[str, int]:
    """Test images whose top-1 class differs from the torch fp32 model's, for torch int8, onnxruntime fp32 and
    onnxruntime int8 (the export written by ``mmkd export --format onnx --int8``)."""
    from transformers import CLIPModel, CLIPProcessor

    from mmkd.eval.zeroshot import evaluate_zeroshot
    from mmkd.interop.to_onnx import export_onnx
    from mmkd.reporting.compression import load_report_dataset, quantize_int8

    ds, templates = load_report_dataset(dataset, max_examples=max_examples)
    kw = dict(templates=templates, progress=False, return_predictions=True)
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    onnx = workdir / f"agreement-{Path(folder).name}"
    export_onnx(folder, onnx, int8=True, measure=False)
    runs = {
        "torch fp32": evaluate_zeroshot(folder, ds, **kw),
        "torch int8": evaluate_zeroshot(quantize_int8(model), ds, processor=processor, **kw),
        "onnxruntime fp32": evaluate_zeroshot(str(onnx), ds, backend="onnxruntime", **kw),
        "onnxruntime int8": evaluate_zeroshot(str(onnx), ds, backend="onnxruntime-int8", **kw),
    }
    base = runs["torch fp32"]["predictions"]
    return {k: sum(a != b for a, b in zip(r["predictions"], base, strict=True)) for k, r in runs.items()
            if k != "torch fp32"} | {"images": len(base)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", nargs="+", default=["offline", "vit-b32"], choices=["offline", "vit-b32"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    p.add_argument("--repeats", type=int, default=5, help="timed batches per encoder (median reported)")
    p.add_argument("--offline-dir", default=str(ROOT / "out" / "offline"), help="make demo's output folder")
    p.add_argument("--narrow-dir", default=str(ROOT / "out" / "study" / "narrow"), help="make study's narrow student")
    p.add_argument("--max-examples", type=int, default=None, help="accuracy on at most this many test images")
    p.add_argument("--no-agreement", action="store_true", help="skip the top-1 agreement counts")
    p.add_argument("--output", required=True, help="JSON file for every report")
    p.add_argument("--markdown", default=None, help="write the side-by-side table here too")
    args = p.parse_args()

    offline = Path(args.offline_dir)
    if "offline" in args.groups and not (offline / "teacher" / "config.json").is_file():
        raise SystemExit(f"--offline-dir {offline}: no trained teacher there; run `make demo` first")
    reports, agreement = [], {}
    with tempfile.TemporaryDirectory(prefix="mmkd-deploy-") as tmp:
        for group in args.groups:
            if group == "offline":
                teacher = str(offline / "teacher")
                students = [str(offline / "distilled")]
                if (Path(args.narrow_dir) / "config.json").is_file():
                    students.append(args.narrow_dir)
                dataset = "fashion_mnist"
            else:
                teacher, students, dataset = "ViT-B-32", vit_b32_students(Path(tmp)), None
            for batch in sorted(args.batch_sizes):
                print(f"[deploy_speed] {group}, batch {batch}", flush=True)
                report = compression_report(
                    teacher, students, dataset if batch == max(args.batch_sizes) else None, onnx=True,
                    batch_size=batch, repeats=args.repeats, max_examples=args.max_examples,
                    log=lambda m: print(f"  {m}", flush=True))
                reports.append({"group": group, "batch_size": batch, "report": report})
            if group == "offline" and not args.no_agreement:
                for folder in (teacher, *students):
                    print(f"[deploy_speed] top-1 agreement of {folder}", flush=True)
                    agreement[Path(folder).name] = prediction_agreement(folder, dataset, args.max_examples, Path(tmp))

    accuracy = {(r["group"], row["model"]): row["acc1"] for r in reports for row in r["report"]["rows"]
                if row["acc1"] is not None}
    lines = ["| group | model | backend | batch | images/s | captions/s | size (MB) | acc@1 (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        for row in r["report"]["rows"]:
            if row["technique"].endswith("pruning"):
                continue
            source, backend = _backend(row)
            acc = accuracy.get((r["group"], row["model"]))
            lines.append(f"| {r['group']} | {source} | {backend} | {r['batch_size']} | {row['image_per_s']:.1f} | "
                         f"{row['text_per_s']:.1f} | {row['size_mb']:.1f} | "
                         f"{'n/a' if acc is None else f'{100 * acc:.2f}'} |")
    if agreement:
        lines += ["", "Test images whose top-1 class differs from torch fp32's:", "",
                  "| model | images | torch int8 | onnxruntime fp32 | onnxruntime int8 |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {a['images']:,} | {a['torch int8']} | {a['onnxruntime fp32']} | {a['onnxruntime int8']} |"
                  for name, a in agreement.items()]
    table = "\n".join(lines) + "\n"
    print(table)
    Path(args.output).write_text(json.dumps({"machine": machine_info(), "reports": reports, "agreement": agreement}, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
