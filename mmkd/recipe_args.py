"""What the recipes share: the data arguments, YAML ``--config`` parsing, and loading the training set.

The recipes in ``recipes/`` stay flat scripts; this module keeps the parts they would otherwise copy.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from mmkd.data.conceptual_captions import load_conceptual_captions
from mmkd.data.fashion_mnist import fashion_mnist_captions
from mmkd.data.synthetic import shapes_dataset


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="shapes",
        metadata={
            "help": "'shapes' (generated coloured shapes, offline), 'fashion_mnist' (Debian IDX files or --data_dir), "
            "'conceptual_captions' (--cc_tsv and webdataset shards in --data_dir, or --cc_image_dir), a directory "
            "written by Dataset.save_to_disk, or a datasets hub id (e.g. pixparse/cc3m-wds)."
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Local files: the Fashion-MNIST IDX folder, or Conceptual Captions webdataset shards (a folder, "
            "glob or brace pattern such as cc3m/{00000..00331}.tar)."
        },
    )
    cc_tsv: str | None = field(default=None, metadata={"help": "Conceptual Captions' official TSV (caption, url)."})
    cc_image_dir: str | None = field(
        default=None, metadata={"help": "Conceptual Captions images downloaded as files keyed by TSV row."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    text_column: str = field(default="text", metadata={"help": "Column holding the captions."})
    streaming: bool = field(default=False, metadata={"help": "Stream a hub dataset (needs --max_steps)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    num_generated_examples: int = field(default=2048, metadata={"help": "Size of the generated 'shapes' set."})
    generated_image_size: int = field(default=32, metadata={"help": "Image side of the generated 'shapes' set."})
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Precompute the teacher's embeddings once into this folder (keyed by teacher weights, "
            "preprocessing and dataset) and train without running the teacher. Map-style datasets only."
        },
    )


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


def load_train_dataset(data_args: DataArguments):
    import datasets

    name = data_args.dataset_name
    if name == "shapes":
        ds = shapes_dataset(data_args.num_generated_examples, image_size=data_args.generated_image_size)
    elif name == "fashion_mnist":
        ds = fashion_mnist_captions(
            split=data_args.train_split, data_dir=data_args.data_dir, max_examples=data_args.max_train_samples
        )
    elif name == "conceptual_captions":
        if data_args.data_dir is None and data_args.cc_image_dir is None:
            raise ValueError("dataset 'conceptual_captions' needs --data_dir (webdataset shards) or --cc_image_dir")
        ds = load_conceptual_captions(
            data_args.cc_tsv,
            shards=data_args.data_dir,
            image_dir=data_args.cc_image_dir,
            split=data_args.train_split,
            streaming=data_args.streaming,
            max_samples=data_args.max_train_samples,
        )
    elif Path(name).is_dir():
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if data_args.train_split not in ds:
                raise ValueError(f"{name}: no split {data_args.train_split!r} (has {sorted(ds)})")
            ds = ds[data_args.train_split]
    else:
        ds = datasets.load_dataset(
            name, data_args.dataset_config_name, split=data_args.train_split, streaming=data_args.streaming
        )
    columns = ds.column_names if ds.column_names is not None else list(ds.features or {})
    for col in (data_args.image_column, data_args.text_column):
        if columns and col not in columns:
            raise ValueError(f"dataset {name!r} has no column {col!r}; its columns are {columns}")
    if data_args.max_train_samples is not None and name not in ("fashion_mnist", "conceptual_captions"):
        ds = ds.take(data_args.max_train_samples) if data_args.streaming else ds.select(
            range(min(data_args.max_train_samples, len(ds)))
        )
    return ds


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
