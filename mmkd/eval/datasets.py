"""Labelled image sets for zero-shot evaluation, read from their real formats (and never via pickle).

``load_classification_dataset`` resolves a name to a :class:`ClassificationDataset` of ``(RGB PIL image, label)``
pairs with human-readable ``classnames``, from, in order of precedence:

a. ``cifar10`` / ``cifar100`` / ``stl10`` with ``data_dir``: the official *binary* downloads (the extracted
   folder, its parent, or the tarball), read by :mod:`mmkd.eval.official_datasets`.
b. ``imagefolder`` with ``data_dir``, or a directory path with one sub-folder per class.
c. a directory written by ``datasets.Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
d. ``cifar10`` / ``cifar100`` / ``stl10`` without ``data_dir``: the Hugging Face Hub copies.
e. any other ``owner/name``: a Hub dataset with an image column and a ``ClassLabel`` column.

The CIFAR "python version" is a set of pickles; unpickling runs arbitrary code, so it is refused with a pointer
to the binary version instead of being read.

The official readers import :class:`ClassificationDataset` from here, so this module imports them inside the
functions that need them.
"""

from __future__ import annotations

import abc
import json
import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from mmkd.checks import HUB_ID

if TYPE_CHECKING:
    import datasets

__all__ = [
    "DATASETS",
    "HUB_ID",
    "IMAGE_EXTENSIONS",
    "ClassificationDataset",
    "DatasetUnavailableError",
    "from_hf_dataset",
    "load_classification_dataset",
]

DATASETS = ("cifar10", "cifar100", "stl10")

# Hub copies used when no data_dir is given: (repository, image column, label column).
_HUB_SOURCES = {
    "cifar10": ("uoft-cs/cifar10", "img", "label"),
    "cifar100": ("uoft-cs/cifar100", "img", "fine_label"),
    "stl10": ("tanganke/stl10", "image", "label"),
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Top-level folder names that mark "<root>/<split>/<class>/..." rather than "<root>/<class>/...".
_SPLIT_FOLDER_NAMES = frozenset({"train", "test", "val", "valid", "validation"})



class DatasetUnavailableError(OSError):
    """A dataset could not be fetched from the Hugging Face Hub (offline, unreachable, or no such repository)."""


class ClassificationDataset(torch.utils.data.Dataset, abc.ABC):
    """A labelled image set: ``ds[i]`` is ``(RGB PIL image, integer label)``.

    Attributes:
        name: short name of the set (``"cifar10"``, a folder name, a Hub id).
        classnames: human-readable class names in label order (``classnames[label]``).

    Subclasses implement ``__len__`` and ``_item`` (called with an index already checked to be in range);
    ``__getitem__`` here does the index handling once for all of them.
    """

    name: str
    classnames: list[str]

    def __init__(self, name: str, classnames: Sequence[str]):
        self.name = name
        self.classnames = list(classnames)

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of images."""

    @abc.abstractmethod
    def _item(self, i: int) -> tuple[Image.Image, int]:
        """Image ``i`` (already range-checked) and its label."""

    def __getitem__(self, i) -> tuple[Image.Image, int]:
        n = len(self)
        index = operator.index(i)  # accepts numpy / 0-d tensor integers, rejects slices and floats
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.name}: index {i} out of range for {n} images")
        return self._item(index)

    def _check_label(self, label: int, where: str) -> int:
        if not 0 <= label < len(self.classnames):
            raise ValueError(f"{where}: label {label} is outside 0..{len(self.classnames) - 1} "
                             f"({len(self.classnames)} classes)")
        return label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, images={len(self)}, classes={len(self.classnames)})"


# --------------------------------------------------------------------------------------------------------------
# (b) image folders
# --------------------------------------------------------------------------------------------------------------


class _ImageFolder(ClassificationDataset):
    def __init__(self, name: str, classnames: list[str], samples: list[tuple[Path, int]]):
        super().__init__(name, classnames)
        self._samples = samples

    def __len__(self) -> int:
        return len(self._samples)

    def _item(self, i: int) -> tuple[Image.Image, int]:
        path, label = self._samples[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), label
        except (OSError, ValueError, SyntaxError) as exc:
            # PIL's messages for truncated or corrupt files often omit the file name.
            raise OSError(f"cannot read image {path}: {exc}") from exc


def _subdirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _load_image_folder(root: Path, split: str, name: str | None = None) -> ClassificationDataset:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} is not a directory")
    classes = _subdirs(root)
    top = {c.name for c in classes}
    if top and top <= _SPLIT_FOLDER_NAMES:
        # "<root>/train/<class>/...": the top-level folders are splits, not classes.
        if split not in top:
            raise ValueError(f"image folder {root}: unknown split {split!r}; choose one of {', '.join(sorted(top))}")
        root = root / split
        classes = _subdirs(root)
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders (expected <root>/<class>/<image>)")
    samples = []
    for label, class_dir in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found += [Path(dirpath, f) for f in filenames
                      if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
        samples += [(p, label) for p in sorted(found)]
    if not samples:
        raise ValueError(f"image folder {root} has class folders but no images with extensions "
                         f"{', '.join(IMAGE_EXTENSIONS)}")
    return _ImageFolder(name or root.name, [c.name.replace("_", " ") for c in classes], samples)


# --------------------------------------------------------------------------------------------------------------
# (c, d, e) Hugging Face datasets
# --------------------------------------------------------------------------------------------------------------


class _HFClassification(ClassificationDataset):
    def __init__(self, name: str, classnames: list[str], ds: datasets.Dataset, image_column: str,
                 label_column: str):
        super().__init__(name, classnames)
        self._ds = ds
        self._image_column = image_column
        self._label_column = label_column

    def __len__(self) -> int:
        return len(self._ds)

    def _item(self, i: int) -> tuple[Image.Image, int]:
        row = self._ds[i]
        image, label = row[self._image_column], row[self._label_column]
        if image is None:
            raise ValueError(f"{self.name}: row {i} has no image in column {self._image_column!r}")
        if label is None:
            raise ValueError(f"{self.name}: row {i} has no label in column {self._label_column!r}")
        return image.convert("RGB"), self._check_label(int(label), f"{self.name} row {i}")


def _pick_column(ds: datasets.Dataset, given: str | None, kind: type, preferred: Sequence[str], what: str,
                 dataset_name: str) -> str:
    columns = list(ds.column_names)
    if given is not None:
        if given not in columns:
            raise ValueError(f"{dataset_name}: {what} column {given!r} not found; columns: {columns}")
        return given
    candidates = [c for c in columns if isinstance(ds.features[c], kind)]
    for c in preferred:
        if c in candidates:
            return c
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise ValueError(f"{dataset_name}: several {kind.__name__} columns {candidates}; pass {what}_column=")
    for c in preferred:  # e.g. an "image" column of file paths, or an integer "label" column
        if c in columns:
            return c
    raise ValueError(f"{dataset_name}: no {what} column (a {kind.__name__} feature or one named "
                     f"{' / '.join(map(repr, preferred))}); columns: {columns}; pass {what}_column=")


def from_hf_dataset(ds: datasets.Dataset, image_column: str | None = None, label_column: str | None = None,
                    classnames: Sequence[str] | None = None, name: str | None = None) -> ClassificationDataset:
    """Wrap a map-style ``datasets.Dataset`` as a :class:`ClassificationDataset`.

    Args:
        ds: the dataset (one split).
        image_column: column holding the images; ``None`` picks the ``datasets.Image`` column (``image`` or
            ``img`` first when there are several). A column of paths or bytes is cast to ``Image``.
        label_column: column holding integer labels; ``None`` picks the ``ClassLabel`` column (``label``,
            ``labels``, then ``fine_label`` first when there are several).
        classnames: class names in label order; ``None`` takes the ``ClassLabel`` names with underscores
            replaced by spaces.
        name: the set's name; defaults to the dataset's own ``info.dataset_name``.
    """
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        raise TypeError(f"from_hf_dataset needs one split, got a DatasetDict with splits {list(ds)}; "
                        f"pass e.g. ds[{next(iter(ds), 'test')!r}]")
    if not isinstance(ds, datasets.Dataset):
        raise TypeError(f"from_hf_dataset needs a map-style datasets.Dataset, got {type(ds).__name__}")
    name = name or getattr(ds.info, "dataset_name", None) or "dataset"
    image_column = _pick_column(ds, image_column, datasets.Image, ("image", "img"), "image", name)
    label_column = _pick_column(ds, label_column, datasets.ClassLabel, ("label", "labels", "fine_label"),
                                "label", name)
    if image_column == label_column:
        raise ValueError(f"{name}: image and label column are both {image_column!r}")
    label_feature = ds.features[label_column]
    if classnames is None:
        if not isinstance(label_feature, datasets.ClassLabel):
            raise ValueError(f"{name}: label column {label_column!r} is {label_feature}, not a ClassLabel, so "
                             f"it has no class names; pass classnames=")
        classnames = [n.replace("_", " ") for n in label_feature.names]
    elif isinstance(label_feature, datasets.ClassLabel) and len(classnames) != label_feature.num_classes:
        raise ValueError(f"{name}: {len(classnames)} classnames given but label column {label_column!r} has "
                         f"{label_feature.num_classes} classes")
    if not classnames:
        raise ValueError(f"{name}: no class names")
    if len(ds) == 0:
        raise ValueError(f"{name}: the dataset has no rows")
    # Only the two columns are decoded per row (not e.g. captions).
    ds = ds.select_columns([image_column, label_column])
    image_feature = ds.features[image_column]
    if not (isinstance(image_feature, datasets.Image) and image_feature.decode):
        try:
            ds = ds.cast_column(image_column, datasets.Image())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: image column {image_column!r} is {image_feature}, which cannot be read as "
                             f"images ({exc})") from exc
    return _HFClassification(name, list(classnames), ds, image_column, label_column)


def _load_saved(path: Path, split: str, image_column: str | None, label_column: str | None,
                name: str | None) -> ClassificationDataset:
    import datasets

    if (path / "dataset_dict.json").is_file():
        # Check the split from the manifest before loading anything.
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        if split not in splits:
            raise ValueError(f"{path}: unknown split {split!r}; choose one of {', '.join(map(repr, splits))}")
        ds = datasets.load_from_disk(str(path / split))
    else:
        ds = datasets.load_from_disk(str(path))
    return from_hf_dataset(ds, image_column, label_column, name=name or path.name)


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub download raises: OSError covers requests, huggingface_hub and datasets' own errors;
    the HTTP client's transport errors are added when it doesn't derive from OSError."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _load_from_hub(repo: str, split: str, image_column: str | None, label_column: str | None, name: str,
                   hint: str) -> ClassificationDataset:
    import datasets

    try:
        ds = datasets.load_dataset(repo, split=split)
    except _network_errors() as exc:
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DatasetUnavailableError(f"{name}: could not load {repo!r} (split {split!r}) from the Hugging Face "
                                      f"Hub: {cause}; {hint}") from exc
    return from_hf_dataset(ds, image_column, label_column, name=name)


# --------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------


def _load_local(path: Path, split: str, image_column: str | None, label_column: str | None,
                name: str | None) -> ClassificationDataset:
    from mmkd.eval import official_datasets as official

    fmt = official.official_layout(path)
    if fmt is not None:
        return official.load_official(fmt, path, split)
    for pickled in official.FORMATS.values():
        if official.is_pickle_layout(pickled, path):
            raise official.pickle_error(pickled, path)
    if path.is_file():
        tarballs = ", ".join(f.tarball for f in official.FORMATS.values())
        raise ValueError(f"{path} is a file; expected a directory (one sub-folder per class, or written by "
                         f"save_to_disk) or an official tarball ({tarballs})")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _load_saved(path, split, image_column, label_column, name)
    return _load_image_folder(path, split, name)


def load_classification_dataset(name: str, data_dir: str | None = None, split: str = "test",
                                image_column: str | None = None,
                                label_column: str | None = None) -> ClassificationDataset:
    """Load a labelled image set for zero-shot evaluation.

    Args:
        name: ``"cifar10"``, ``"cifar100"`` or ``"stl10"`` (official binary files from ``data_dir``, else the
            Hub copy); ``"imagefolder"`` (with ``data_dir``); a local directory (an official layout, one
            sub-folder per class, or a ``save_to_disk`` output) or official tarball; or a Hub id ``owner/name``.
        data_dir: where the local copy is: for the built-in names, the extracted official folder, its parent,
            or the tarball; for other names, the directory to read (``name`` then only names the set).
        split: ``"train"`` or ``"test"`` for the built-in sets; the split of a ``DatasetDict`` or Hub
            dataset; for an image folder, used only when its top-level folders are splits (``train/``...).
        image_column, label_column: override column auto-detection for Hub / ``save_to_disk`` datasets.

    Raises:
        ValueError: unknown name or split, malformed or truncated files, the refused CIFAR pickle version.
        FileNotFoundError: a file of the official layout is missing (the message names the path expected).
        DatasetUnavailableError: a Hub download failed (e.g. offline).
    """
    if not isinstance(name, str | os.PathLike):
        raise TypeError(f"dataset name must be a string or path, got {type(name).__name__}")
    from mmkd.eval import official_datasets as official

    name_str = os.fspath(name)
    key = name_str.lower()
    if key in official.FORMATS:
        fmt = official.FORMATS[key]
        official.check_split(fmt, split)
        if data_dir is not None:
            return official.load_official(fmt, Path(data_dir).expanduser(), split)
        repo, image_col, label_col = _HUB_SOURCES[key]
        return _load_from_hub(repo, split, image_column or image_col, label_column or label_col, key,
                              hint=f"pass data_dir= with the official binary files ({fmt.folder}/ or "
                                   f"{fmt.tarball} from {fmt.url})")
    if key == "imagefolder":
        if data_dir is None:
            raise ValueError("name='imagefolder' needs data_dir= (a directory with one sub-folder per class)")
        return _load_image_folder(Path(data_dir).expanduser(), split)
    path = Path(name_str).expanduser()
    if path.exists():
        if data_dir is not None:
            raise ValueError(f"name {name_str!r} is already a local path; don't pass data_dir={data_dir!r} too")
        return _load_local(path, split, image_column, label_column, None)
    if data_dir is not None:
        return _load_local(Path(data_dir).expanduser(), split, image_column, label_column, name_str)
    if HUB_ID.fullmatch(name_str):
        return _load_from_hub(name_str, split, image_column, label_column, name_str,
                              hint=f"if {name_str!r} was meant as a local directory, it does not exist")
    if "/" in name_str or os.sep in name_str or name_str.startswith((".", "~")):
        raise FileNotFoundError(f"dataset path {path} does not exist")
    raise ValueError(
        f"unknown dataset {name_str!r}; supported: {', '.join(DATASETS)} (official binary files via data_dir=, "
        f"else the Hub copy), 'imagefolder' with data_dir=, a local directory (one sub-folder per class, or "
        f"written by datasets' save_to_disk), an official tarball, or a Hub dataset id 'owner/name'"
    )
