"""Where the recipes' data comes from: the data arguments and the tables of named sources.

:data:`DATASETS` (image-caption sets for CLIP distillation) and :data:`PAIR_DATASETS` (matched / mismatched pairs for
match distillation) map a ``dataset_name`` to a :class:`DatasetSource`: how to build the set from the data arguments
and how the model card describes it. A name that is no key is read as a ``save_to_disk`` folder or, for image-caption
sets, a hub dataset id. A new source is one entry -- in a subclass of the arguments, whose ``sources`` the loaders
read::

    @dataclass
    class MyData(DataArguments):
        sources = {**DATASETS, "mine": DatasetSource(build=my_builder, description="my captions")}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mmkd.checks import HUB_ID, ConfigError
from mmkd.data.baddata import drop_bad_rows

__all__ = [
    "DATASETS",
    "PAIR_DATASETS",
    "DataArguments",
    "DatasetSource",
    "PairDataArguments",
    "check_columns",
    "check_data_args",
    "class_names",
    "describe_dataset",
    "load_pairs",
    "load_train_dataset",
]


@dataclass(frozen=True)
class DatasetSource:
    """One named source: ``build(data_args)`` returns the dataset (a ``Dataset`` or ``IterableDataset`` of at most
    ``max_train_samples`` rows or, for pairs, a ``DatasetDict`` with ``train`` and ``validation``); ``description`` is the card's training-data line, a format
    string over the data arguments' fields or a function of them."""

    build: Callable[[Any], Any]
    description: str | Callable[[Any], str]
    hub_id: str | None = None  # the dataset's id on the Hub, for the card's metadata

    def describe(self, data_args: Any) -> str:
        return self.description(data_args) if callable(self.description) else self.description.format(**vars(data_args))


# -- image-caption sets ------------------------------------------------------------------------------------------
def _shapes(a):
    from mmkd.data.shapes import shapes_dataset

    ds = shapes_dataset(a.num_generated_examples, image_size=a.generated_image_size)
    return ds.select(range(min(a.max_train_samples, len(ds)))) if a.max_train_samples is not None else ds


def _fashion_mnist(a):
    from mmkd.data.fashion_mnist import fashion_mnist_captions

    return fashion_mnist_captions(split=a.train_split, data_dir=a.data_dir, max_examples=a.max_train_samples)


def _conceptual_captions(a):
    from mmkd.data.conceptual_captions import load_conceptual_captions

    if a.data_dir is None and a.cc_image_dir is None:
        raise ValueError("dataset 'conceptual_captions' needs --data_dir (webdataset shards) or --cc_image_dir")
    return load_conceptual_captions(
        a.cc_tsv, shards=a.data_dir, image_dir=a.cc_image_dir, split=a.train_split, streaming=a.streaming,
        max_samples=a.max_train_samples,
    )


def _image_folder(a):
    """An image folder with one sub-folder per class (``datasets``' ``imagefolder`` builder: ``image``, ``label``),
    captioned ``"a photo of a <class>."`` (the folder name, underscores as spaces) in a ``text`` column."""
    import datasets

    if a.data_dir is None:
        raise ConfigError("dataset_name=imagefolder: needs --data_dir, a folder with one sub-folder of images per "
                          "class")
    ds = datasets.load_dataset("imagefolder", data_dir=a.data_dir, split=a.train_split)
    names = ds.features["label"].names if "label" in ds.features else None
    if not names:
        raise ConfigError(f"data_dir={a.data_dir}: no class sub-folders (imagefolder found no labels)")
    names = [n.replace("_", " ") for n in names]  # the captions' and the class prompts' names
    ds = ds.cast_column("label", datasets.ClassLabel(names=names))
    ds = ds.map(lambda rows: {"text": [f"a photo of a {names[y]}." for y in rows["label"]]}, batched=True)
    if a.max_train_samples is not None:  # the files come class by class: a seeded shuffle keeps every class
        ds = ds.shuffle(seed=0).select(range(min(a.max_train_samples, len(ds))))
    return drop_bad_rows(ds, a.image_column, a.text_column, what=f"image folder {a.data_dir}")


def class_names(dataset, data_args) -> list[str]:
    """The class names of ``label_column`` (a ``ClassLabel``), for the zero-shot class-logit terms; a
    :class:`~mmkd.checks.ConfigError` naming the option when the column is missing or holds no class names."""
    features = getattr(dataset, "features", None) or {}
    column = data_args.label_column
    if column not in features:
        raise ConfigError(f"label_column={column}: dataset {data_args.dataset_name!r} has no such column (its "
                          f"columns are {', '.join(features) or 'unknown'}); class_kd_weight > 0 needs class labels")
    names = getattr(features[column], "names", None)
    if not names:
        raise ConfigError(f"label_column={column}: not a ClassLabel column (no class names); cast it with "
                          "Dataset.cast_column(..., ClassLabel(names=[...]))")
    return list(names)


def _fashion_mnist_description(a) -> str:
    subset = f"{a.max_train_samples:,} images of the" if a.max_train_samples else "the"
    return (f"Fashion-MNIST: {subset} training split (class-balanced), each captioned from its class name "
            "through one of 20 templates (`mmkd.data.fashion_mnist`)")


DATASETS: dict[str, DatasetSource] = {
    "shapes": DatasetSource(
        _shapes, "generated coloured shapes with captions (`mmkd.data.shapes`; for tests and smoke runs)"
    ),
    "fashion_mnist": DatasetSource(_fashion_mnist, _fashion_mnist_description, hub_id="fashion_mnist"),
    "imagefolder": DatasetSource(
        _image_folder, "the image folder {data_dir} (one sub-folder per class, captioned \"a photo of a <class>.\")"
    ),
    "conceptual_captions": DatasetSource(
        _conceptual_captions,
        "Conceptual Captions (image-caption pairs; `mmkd.data.conceptual_captions`)",
        hub_id="conceptual_captions",
    ),
}


@dataclass
class DataArguments:
    """The training set of a CLIP run (``recipes/clip_student.py``, ``recipes/train_teacher.py``)."""

    sources: ClassVar[Mapping[str, DatasetSource]] = DATASETS
    hub_datasets: ClassVar[bool] = True  # an org/name dataset_name is read from the Hub

    dataset_name: str = field(
        default="shapes",
        metadata={
            "help": "'shapes' (generated coloured shapes, offline), 'fashion_mnist' (Debian IDX files or --data_dir), "
            "'imagefolder' (--data_dir with one sub-folder per class), "
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
    label_column: str = field(
        default="label", metadata={"help": "ClassLabel column of class indices (the class-logit KD terms only)."}
    )
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
    teacher_sidecar_dir: str | None = field(
        default=None,
        metadata={
            "help": "Streamed webdataset shards (conceptual_captions, --data_dir, --streaming true): write the "
            "teacher's embeddings once per shard into this folder (<shard>.teacher.safetensors; keyed, resumable, "
            "built by every process in parallel) and train from shards + sidecars without running the teacher."
        },
    )
    teacher_views: int = field(
        default=0,
        metadata={
            "help": "With --teacher_sidecar_dir: K augmented views (random resized crop + flip) embedded per image; "
            "training samples one per image and epoch and the student sees exactly that view. 0: the teacher's "
            "deterministic validation view only."
        },
    )


_GLOB = ("*", "?", "[", "{")


def _check_path(option: str, value: str | None, kind: str = "path") -> None:
    if value is None or any(c in str(value) for c in _GLOB):  # a glob / brace pattern is resolved by its reader
        return
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(f"{option}={value}: no such {'file or directory' if kind == 'path' else kind}")
    if kind == "directory" and not path.is_dir():
        raise ConfigError(f"{option}={value}: not a directory")


def check_data_args(data_args) -> None:
    """Refuse what cannot work before anything is loaded: an unknown ``dataset_name`` (with the known ones), paths
    that do not exist, sizes below 1, a cache with a stream. Raises :class:`~mmkd.checks.ConfigError`."""
    name = data_args.dataset_name
    hub = data_args.hub_datasets and HUB_ID.fullmatch(name) and not _looks_like_path(name)
    if name not in data_args.sources and not Path(name).is_dir() and not hub:
        kind = "no such directory" if _looks_like_path(name) or "/" in name else "unknown dataset"
        others = ", a folder written by save_to_disk" + (" or an org/name hub dataset id" if data_args.hub_datasets
                                                         else "")
        raise ConfigError(f"dataset_name={name}: {kind}; choose one of {', '.join(data_args.sources)}{others}")
    for option in ("data_dir", "cc_tsv", "cc_image_dir"):
        _check_path(option, getattr(data_args, option, None))
    for option in ("max_train_samples", "max_eval_samples", "num_generated_examples", "generated_image_size"):
        value = getattr(data_args, option, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{option}={value}: must be an integer >= 1")
    if getattr(data_args, "teacher_cache_dir", None) and getattr(data_args, "streaming", False):
        raise ConfigError(f"teacher_cache_dir={data_args.teacher_cache_dir}: the cache needs a map-style dataset; "
                          "it cannot be used with streaming=true (use teacher_sidecar_dir for a stream of shards)")
    sidecars, views = getattr(data_args, "teacher_sidecar_dir", None), getattr(data_args, "teacher_views", 0)
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise ConfigError(f"teacher_views={views}: must be an integer >= 0")
    if views and not sidecars:
        raise ConfigError(f"teacher_views={views}: augmented views are stored in teacher sidecars; set "
                          "teacher_sidecar_dir")
    if sidecars and (name != "conceptual_captions" or not data_args.data_dir or not data_args.streaming):
        raise ConfigError(f"teacher_sidecar_dir={sidecars}: sidecars sit beside webdataset shards; use "
                          "dataset_name=conceptual_captions with data_dir=<shards> and streaming=true")
    if sidecars and getattr(data_args, "teacher_cache_dir", None):
        raise ConfigError(f"teacher_sidecar_dir={sidecars}: choose one of teacher_cache_dir and teacher_sidecar_dir")


def check_columns(dataset, data_args, columns: tuple[str, ...] | None = None) -> None:
    """The dataset has the image and text columns the arguments name (``ConfigError`` listing its columns)."""
    present = dataset.column_names if dataset.column_names is not None else list(dataset.features or {})
    for option in columns or ("image_column", "text_column"):
        col = getattr(data_args, option)
        if present and col not in present:
            raise ConfigError(f"{option}={col}: dataset {data_args.dataset_name!r} has no such column; its columns "
                              f"are {', '.join(present)}")


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def describe_dataset(data_args) -> str:
    """The card's training-data line for ``data_args``."""
    source = data_args.sources.get(data_args.dataset_name)
    return source.describe(data_args) if source else f"`{data_args.dataset_name}`"


def load_train_dataset(data_args: DataArguments):
    """The training set named by ``data_args`` (a source of its table, a ``save_to_disk`` folder or a hub id) with its
    image and text columns checked, at most ``max_train_samples`` rows, and (folders and hub sets) without the rows
    that cannot be trained on (:func:`mmkd.data.baddata.drop_bad_rows`: skipped and counted)."""
    import datasets

    name = data_args.dataset_name
    source = data_args.sources.get(name)
    if source is not None:
        ds = source.build(data_args)
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
    check_columns(ds, data_args)
    if source is None:  # the table's sources apply the cap and the bad-data policy themselves
        n = data_args.max_train_samples
        if n is not None:
            ds = ds.take(n) if data_args.streaming else ds.select(range(min(n, len(ds))))
        ds = drop_bad_rows(ds, data_args.image_column, data_args.text_column, what=f"dataset {name}")
    return ds


# -- matching pairs ----------------------------------------------------------------------------------------------
def _fashion_mnist_pairs(a):
    from mmkd.data.pairs import fashion_mnist_matching

    return fashion_mnist_matching(
        a.data_dir, seed=a.pairs_seed, max_train_samples=a.max_train_samples, max_eval_samples=a.max_eval_samples
    )


def _coco_pairs(a):
    from mmkd.data.coco import build_coco_matching

    if a.data_dir is None:
        raise ValueError("--dataset_name coco needs --data_dir: the COCO root (annotations/ and the image folders)")
    return build_coco_matching(a.data_dir, seed=a.pairs_seed)


PAIR_DATASETS: dict[str, DatasetSource] = {
    "fashion_mnist": DatasetSource(
        _fashion_mnist_pairs,
        "Fashion-MNIST matching pairs (`mmkd.data.pairs.fashion_mnist_matching`): each image with a templated caption "
        "of its class (match) or of another class (mismatch), balanced",
        hub_id="fashion_mnist_matching",
    ),
    "coco": DatasetSource(
        _coco_pairs,
        "COCO captions matching pairs (`mmkd.data.build_coco_matching`): one caption per image, half the images "
        "given another image's caption, balanced",
        hub_id="coco_matching",
    ),
}


@dataclass
class PairDataArguments:
    """The matching pairs of a match run (``recipes/match_student.py``)."""

    sources: ClassVar[Mapping[str, DatasetSource]] = PAIR_DATASETS
    hub_datasets: ClassVar[bool] = False

    dataset_name: str = field(
        default="fashion_mnist",
        metadata={"help": "fashion_mnist (offline pairs; mismatches from another class), coco (the official files "
                  "in --data_dir), or a DatasetDict saved with save_to_disk (train/validation; image, text, label)."},
    )
    data_dir: str | None = field(default=None, metadata={"help": "Fashion-MNIST IDX folder or COCO root."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on the training pairs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on the validation pairs."})
    pairs_seed: int | None = field(
        default=None, metadata={"help": "Seed of the pair construction (default: --seed). Fix it to vary only the "
                                "students' initialisation and data order with --seed (a seed study)."}
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Compute the fine-tuned teacher's embeddings of the training pairs once into this folder "
                  "(keyed by its weights, preprocessing and the pairs) and distil without running it (the sweep "
                  "always caches, in <output_dir>/teacher_cache by default)."},
    )


def load_pairs(data_args: PairDataArguments):
    """``DatasetDict(train=..., validation=...)`` of (image, text, label) pairs, capped at the arguments' sizes.
    ``data_args.pairs_seed`` must be set (the recipe defaults it to ``--seed``)."""
    import datasets

    name = data_args.dataset_name
    source = data_args.sources.get(name)
    if source is not None:
        pairs = source.build(data_args)
    elif Path(name).is_dir():
        loaded = datasets.load_from_disk(name)
        pairs = datasets.DatasetDict({split: drop_bad_rows(ds, "image", "text", what=f"{name} {split}")
                                      for split, ds in loaded.items()})
    else:
        raise ValueError(f"--dataset_name {name!r}: expected one of {', '.join(data_args.sources)} or a save_to_disk "
                         "folder")
    for split in ("train", "validation"):
        if split not in pairs:
            raise ValueError(f"--dataset_name {name!r} has no {split!r} split (it has {list(pairs)})")
    caps = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples}
    return datasets.DatasetDict({
        s: pairs[s].select(range(min(caps[s], len(pairs[s])))) if caps[s] else pairs[s] for s in ("train", "validation")
    })
