"""``mmkd export STUDENT_DIR OUTPUT_DIR``: a CLIP student as an open_clip checkpoint (:mod:`mmkd.interop.to_open_clip`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmkd.interop.to_open_clip import CONFIG_NAME, DEFAULT_MODEL_NAME, WEIGHTS_NAME, export_open_clip


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export a transformers CLIPModel folder (an mmkd student) as an open_clip checkpoint: "
        f"{CONFIG_NAME}, <model-name>.json and {WEIGHTS_NAME}. Load it with "
        "open_clip.create_model_and_transforms('local-dir:OUTPUT_DIR').",
    )
    p.add_argument("student_dir", metavar="STUDENT_DIR", help="folder written by CLIPModel.save_pretrained")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder to write the open_clip files to")
    p.add_argument(
        "--model-name",
        default=DEFAULT_MODEL_NAME,
        help=f"name open_clip.add_model_config registers the bare config under (default: {DEFAULT_MODEL_NAME})",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the embedding check against the CLIPModel")
    return p


def run(args: argparse.Namespace, prog: str) -> int:
    """Export and print the written paths; bad input is one line (raised before anything is written)."""
    paths = export_open_clip(args.student_dir, args.output_dir, args.model_name, verify=not args.no_verify)
    for what, path in paths.items():
        print(f"{what}: {path}")
    out = Path(args.output_dir)
    print(f"load it with: open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0
