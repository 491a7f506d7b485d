"""``mmkd push FOLDER --repo-id ID``: a trained student folder to the Hugging Face Hub (:mod:`mmkd.hub`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmkd.cli import CommandError
from mmkd.hub import DEFAULT_COMMIT_MESSAGE, PushError, files_to_push, push_folder


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Push a trained student folder (weights, config, processor, card, results) to the Hub.",
    )
    p.add_argument("folder", help="the output_dir of a training run (e.g. out/vit-b32-half)")
    p.add_argument("--repo-id", required=True, help="the repository: user/name or org/name (name alone: your user)")
    p.add_argument("--private", action="store_true", help="create the repository private (no effect if it exists)")
    p.add_argument("--token", default=None, help="a write token (default: HF_TOKEN or the `hf auth login` token)")
    p.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    p.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE, help="message of the commit")
    p.add_argument("--include-runs", action="store_true", help="also push runs/ (TensorBoard event files)")
    p.add_argument("--dry-run", action="store_true", help="list the files that would be pushed; send nothing")
    return p


def run(args: argparse.Namespace, prog: str) -> int:
    """Push (or list with ``--dry-run``); exit status 0 pushed or listed, 1 when the push failed (one line)."""
    try:
        if args.dry_run:
            files = files_to_push(args.folder, include_runs=args.include_runs)
            for path in files:
                print(path.as_posix())
            if not (Path(args.folder) / "README.md").is_file():
                print("README.md  (model card, written from the folder's records when pushing)")
            return 0
        url = push_folder(
            args.folder,
            args.repo_id,
            token=args.token,
            private=True if args.private else None,
            commit_message=args.commit_message,
            revision=args.revision,
            include_runs=args.include_runs,
        )
    except (PushError, OSError, ValueError) as err:
        raise CommandError(str(err), status=1) from None
    print(f"pushed {args.folder}: {url}")
    return 0
