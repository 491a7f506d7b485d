"""``mmkd export [--format open_clip|onnx|sentence-transformers] STUDENT_DIR OUTPUT_DIR``: a CLIP student as an
open_clip checkpoint (:mod:`mmkd.interop.to_open_clip`), as ONNX encoders for onnxruntime
(:mod:`mmkd.interop.to_onnx`) or as a sentence-transformers model (:mod:`mmkd.interop.to_sentence_transformers`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmkd.interop.to_open_clip import CONFIG_NAME, DEFAULT_MODEL_NAME, WEIGHTS_NAME, export_open_clip


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export a transformers CLIPModel folder (an mmkd student). --format open_clip (default): "
        f"{CONFIG_NAME}, <model-name>.json and {WEIGHTS_NAME}, loaded with "
        "open_clip.create_model_and_transforms('local-dir:OUTPUT_DIR'). --format onnx: image_encoder.onnx and "
        "text_encoder.onnx (dynamic batch and length; checked against the CLIPModel in onnxruntime before "
        "anything is written) with the tokenizer and image processor; --int8 adds onnxruntime's dynamic int8 copies "
        "and measures them (the model card's int8 section). Written to STUDENT_DIR/onnx, the ONNX files are pushed "
        "with the student by mmkd push.",
    )
    p.add_argument("--format", choices=["open_clip", "onnx", "sentence-transformers"], default="open_clip",
                   help="what to write (sentence-transformers: a folder SentenceTransformer(path) loads, encoding "
                   "images and strings)")
    p.add_argument("--int8", action="store_true", help="onnx: also write dynamically int8-quantized encoders, and "
                   "measure them against the fp32 ones (size, onnxruntime speed, embedding cosine; recorded in "
                   "mmkd_onnx.json for the model card)")
    p.add_argument("--eval-dataset", default=None, help="onnx --int8: also measure zero-shot accuracy of the fp32 "
                   "and int8 encoders on this dataset (fashion_mnist, cifar10, ... with --data-dir, an image folder)")
    p.add_argument("--data-dir", default=None, help="folder holding --eval-dataset's files")
    p.add_argument("--max-examples", type=int, default=None, help="--eval-dataset: at most this many images")
    p.add_argument("student_dir", metavar="STUDENT_DIR", help="folder written by CLIPModel.save_pretrained")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder to write the export to (it may be STUDENT_DIR "
                   "itself for open_clip, STUDENT_DIR/onnx for onnx, so that mmkd push pushes them with the student)")
    p.add_argument(
        "--model-name",
        default=DEFAULT_MODEL_NAME,
        help=f"name open_clip.add_model_config registers the bare config under (default: {DEFAULT_MODEL_NAME})",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the embedding check against the CLIPModel")
    return p


def run(args: argparse.Namespace, prog: str) -> int:
    """Export and print the written paths; bad input is one line (raised before anything is written)."""
    if args.format != "open_clip" and (args.no_verify or args.model_name != DEFAULT_MODEL_NAME):
        raise ValueError(f"--no-verify and --model-name apply to --format open_clip only (the {args.format} export "
                         "is always checked)")
    if args.int8 and args.format != "onnx":
        raise ValueError("--int8 applies to --format onnx only")
    for option, value in (("--eval-dataset", args.eval_dataset), ("--data-dir", args.data_dir),
                          ("--max-examples", args.max_examples)):
        if value is not None and not args.int8:
            raise ValueError(f"{option} applies to --format onnx --int8 only (it measures the int8 encoders)")
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"--max-examples must be >= 1, got {args.max_examples}")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise ValueError(f"--data-dir {args.data_dir!r} is not a directory")
    if args.format == "onnx":
        from mmkd.cli import CommandError
        from mmkd.interop.to_onnx import MissingONNXError, export_onnx

        try:
            result = export_onnx(args.student_dir, args.output_dir, int8=args.int8, eval_dataset=args.eval_dataset,
                                 data_dir=args.data_dir, max_examples=args.max_examples)
        except MissingONNXError as err:
            raise CommandError(str(err)) from None
        for what, path in result["paths"].items():
            print(f"{what}: {path}")
        worst = max(result["max_abs_diff"].values())
        print(f"onnxruntime embeddings equal the CLIPModel's (max abs difference {worst:.2g})")
        report = result["int8_report"]
        if report is not None:
            print(f"int8: {report['size_mb']['int8']:.1f} MB (fp32 {report['size_mb']['fp32']:.1f} MB); images/s "
                  f"{report['image_per_s']['int8']:.1f} (fp32 {report['image_per_s']['fp32']:.1f}), captions/s "
                  f"{report['text_per_s']['int8']:.1f} (fp32 {report['text_per_s']['fp32']:.1f}) at batch "
                  f"{report['batch_size']}; lowest cosine to fp32: image {report['min_cosine_to_fp32']['image']:.4f},"
                  f" text {report['min_cosine_to_fp32']['text']:.4f}")
            acc = report["accuracy"]
            if acc is not None:
                print(f"zero-shot acc@1 on {acc['dataset']} ({acc['num_images']:,} images): int8 "
                      f"{100 * acc['int8_acc1']:.2f} %, fp32 {100 * acc['fp32_acc1']:.2f} % "
                      f"(delta {100 * (acc['int8_acc1'] - acc['fp32_acc1']):+.2f} points)")
        return 0
    if args.format == "sentence-transformers":
        from mmkd.interop.to_sentence_transformers import export_sentence_transformers

        result = export_sentence_transformers(args.student_dir, args.output_dir)
        print(f"sentence-transformers model written to {args.output_dir} ({len(result['files'])} files; max abs "
              f"difference to the CLIPModel {result['max_abs_diff']:.2g})")
        print(f"load it with: SentenceTransformer('{args.output_dir}')")
        return 0
    paths = export_open_clip(args.student_dir, args.output_dir, args.model_name, verify=not args.no_verify)
    for what, path in paths.items():
        print(f"{what}: {path}")
    out = Path(args.output_dir)
    print(f"load it with: open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0
