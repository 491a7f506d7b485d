"""What the recipes share besides their data (:mod:`mmkd.data.sources`): YAML ``--config`` parsing, the record of a
run's options, its reproduce line, and importing a sibling recipe.

The recipes in ``recipes/`` stay flat scripts; this module keeps the parts they would otherwise copy.
"""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from transformers import HfArgumentParser


def parse_args(argv: list[str] | None, *dataclass_types) -> tuple:
    """Parse ``--config file.yaml`` (optional) and command-line options into ``dataclass_types``; the command line
    wins. Unknown YAML keys and a missing file end the program with a message naming them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise SystemExit("--config needs a path to a YAML file")
        path = Path(argv[i + 1])
        del argv[i : i + 2]
        if not path.is_file():
            raise SystemExit(f"--config {path}: no such file")
        cfg = yaml.safe_load(path.read_text()) or {}
        if not isinstance(cfg, dict):
            raise SystemExit(f"--config {path}: expected a mapping of option names to values")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise SystemExit(f"--config {path}: unknown option(s) {', '.join(unknown)}")
        parser.set_defaults(**cfg)
        # Options a YAML file provides are no longer required on the command line.
        for action in parser._actions:
            if action.dest in cfg:
                action.required = False
    return tuple(parser.parse_args_into_dataclasses(args=argv))


def write_training_config(args, *others) -> Path:
    """Write every option of a run (the TrainingArguments subclass plus the other argument dataclasses) to
    ``<output_dir>/training_config.json``: what the model card and a later re-run read. Secrets (hub tokens) are
    dropped."""
    from dataclasses import asdict

    config = json.loads(args.to_json_string())
    for other in others:
        config.update(asdict(other))
    for key in [k for k in config if k.endswith("_token")]:
        config.pop(key)
    path = Path(args.output_dir, "training_config.json")
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def command_line(script: str, argv: Sequence[str]) -> str:
    """``accelerate launch <script> <argv>`` for a card's reproduce block, with every ``--*_token`` value removed
    (a token on the command line must not end up in a public README)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name.startswith("--") and name.endswith("_token"):
            skip = "=" not in arg
            continue
        kept.append(arg)
    return shlex.join(["accelerate", "launch", script, *kept])


def import_script(path: str | Path):
    """Import a recipe script (``recipes/clip_student.py``) as a module, by its path: how one recipe runs another
    in-process (the offline job's stages) without putting ``recipes/`` on ``sys.path``."""
    path = Path(path)
    name = f"mmkd_recipe_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the recipe {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module
