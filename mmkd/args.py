"""What the recipes share besides their data (:mod:`mmkd.data.sources`): YAML ``--config`` parsing, the record of a
run's options, its reproduce line, and importing a sibling recipe.

The recipes in ``recipes/`` stay flat scripts; this module keeps the parts they would otherwise copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import re
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from mmkd.checks import ConfigError


class _OneLineParser(HfArgumentParser):
    """``HfArgumentParser`` whose errors (an invalid int, an unknown flag) are :class:`ConfigError` s, not a usage
    block followed by an error line."""

    def error(self, message: str):
        # "argument --x/--x-alias: invalid int value: 'eight'" -> "x='eight': invalid int value"
        m = re.fullmatch(r"argument --([\w-]+)(?:/--[\w-]+)*: (.*?)(?:: ('.*'))?", message)
        if m:
            option, why, value = m.groups()
            raise ConfigError(f"{option}={value}: {why}" if value else f"{option}: {why}")
        raise ConfigError(message)


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Around a recipe's parsing and up-front checks: a bad option (``ConfigError``, or the ``ValueError`` of a
    config's ``__post_init__``) ends the program with one line on stderr and exit status 2, before any model or
    dataset is loaded."""
    try:
        yield
    except ValueError as err:
        message = _redact(" ".join(str(err).split())) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _yaml_argv(cfg: dict, parser: HfArgumentParser, path: Path) -> list[str]:
    """A YAML config as command-line arguments, so its values go through the parser's own type conversion (a list
    where one number belongs, ``8.5`` for an int, ``"yes"`` for a bool are refused like on the command line)."""
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(set(cfg) - set(actions))
    if unknown:
        raise ConfigError(f"config={path}: unknown option(s) {', '.join(unknown)}")
    # fields typed to take a list although their parser action takes one value (report_to, fsdp): the config's
    # own __post_init__ reads a list there
    # (the declared annotation: HfArgumentParser rewrites ``field.type`` to the one type its action parses)
    list_typed = {name for dc in parser.dataclass_types for klass in dc.__mro__
                  for name, ann in vars(klass).get("__annotations__", {}).items() if "list" in str(ann)}
    argv: list[str] = []
    for key, value in cfg.items():
        action = actions[key]
        takes_list = action.nargs in ("+", "*")
        if isinstance(value, list) and not takes_list:
            if key not in list_typed:
                raise ConfigError(f"{key}={value!r}: expected one value, not a list ({path})")
            parser.set_defaults(**{key: [_cli_value(v) for v in value]})
            continue
        if value is None:
            parser.set_defaults(**{key: None})
            action.required = False
            continue
        if takes_list:
            argv += [f"--{key}", *(_cli_value(v) for v in (value if isinstance(value, list) else [value]))]
        else:
            argv.append(f"--{key}={_cli_value(value)}")  # one token: a value starting with '-' stays a value
    return argv


def _cli_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return json.dumps(value)  # e.g. fsdp_config: TrainingArguments reads JSON strings
    return str(value)


def parse_args(argv: list[str] | None, *dataclass_types) -> tuple:
    """Parse ``--config file.yaml`` (optional) and command-line options into ``dataclass_types``; the command line
    wins. Every problem -- a missing or malformed file, an unknown key, a value of the wrong type, a value a config
    refuses -- raises :class:`ConfigError` naming the option."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _OneLineParser(dataclass_types)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("config: --config needs a path to a YAML file")
        path = Path(argv[i + 1])
        del argv[i : i + 2]
        if not path.is_file():
            raise ConfigError(f"config={path}: no such file")
        try:
            cfg = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config={path}: not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"config={path}: expected a mapping of option names to values")
        argv = _yaml_argv(cfg, parser, path) + argv  # later flags win in argparse: the command line overrides
    try:
        return tuple(parser.parse_args_into_dataclasses(args=argv))
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise ConfigError(_redact(str(err))) from None
        # "Some specified arguments are not used ...: ['--hub_tokn', 'hf_...']": a mistyped token option's value
        raise ConfigError(_redact(" ".join(str(err).split()))) from None


_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}")


def _redact(text: str) -> str:
    """``text`` with anything shaped like a Hugging Face token (``hf_`` + 8 or more letters and digits) blanked."""
    return _TOKEN.sub("hf_***", text)


def refuse_token_option(args) -> None:
    """A Hub token given as an option (``--hub_token``) is refused: options reach process lists, a launcher's error
    message (``accelerate launch`` prints its child's command line when it fails) and the pickled arguments of every
    checkpoint. The push reads ``HF_TOKEN`` or the ``hf auth login`` token itself."""
    if getattr(args, "hub_token", None):
        raise ConfigError("hub_token: pass the token through the HF_TOKEN environment variable or `hf auth login`, "
                          "not as an option (options reach process lists, launcher errors and saved arguments)")


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


def _option_values(argv: Sequence[str], option: str) -> list[str]:
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]
    return values + [a.split("=", 1)[1] for a in argv if a.startswith(option + "=")]


def run_inputs(argv: Sequence[str]) -> dict[str, Any]:
    """What a run's result depends on beyond its command line: the SHA-256 of each ``--config`` file it reads and
    the size and modification time of the last ``--teacher_name_or_path`` folder's weight files. A finished run
    is reused only while these and its arguments are unchanged (editing the YAML or retraining the teacher
    retrains it)."""
    configs = {}
    for value in _option_values(argv, "--config"):
        path = Path(value)
        configs[value] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    teacher = {}
    teachers = _option_values(argv, "--teacher_name_or_path")
    if teachers and Path(teachers[-1]).is_dir():
        for weights in sorted(Path(teachers[-1]).glob("*.safetensors")) + sorted(Path(teachers[-1]).glob("*.bin")):
            stat = weights.stat()
            teacher[weights.name] = [stat.st_size, stat.st_mtime_ns]
    return {"configs": configs, "teacher_weights": teacher}


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
