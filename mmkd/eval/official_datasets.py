"""The official binary downloads of CIFAR-10, CIFAR-100 and STL-10, read without pickle.

``data_dir`` may be the extracted folder (``cifar-10-batches-bin/``, ``cifar-100-binary/``, ``stl10_binary/``), its
parent, or the tarball itself, read through ``tarfile`` without extracting. Extracted files are memory-mapped and
one image is decoded per ``__getitem__``, so a 50,000-image set never sits in memory as PIL images. The CIFAR
"python version" is a set of pickles; unpickling runs arbitrary code, so it is refused with a pointer to the
binary version. Entry point: :func:`mmkd.eval.datasets.load_classification_dataset`.
"""

from __future__ import annotations

import bisect
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmkd.eval.datasets import ClassificationDataset

__all__ = ["FORMATS", "OfficialFormat", "check_split", "is_pickle_layout", "load_official", "official_layout",
           "pickle_error"]

_CIFAR_PIXELS = 3 * 32 * 32
_STL_PIXELS = 3 * 96 * 96


@dataclass(frozen=True)
class OfficialFormat:
    name: str
    title: str
    folder: str  # folder inside the tarball
    tarball: str
    url: str
    splits: dict[str, tuple[str, ...]]  # split -> data files (for STL-10: X then y)
    names_file: str
    num_classes: int
    pickle_folder: str | None = None  # the "python version", which is refused
    pickle_tarball: str | None = None


FORMATS = {
    "cifar10": OfficialFormat(
        name="cifar10", title="CIFAR-10", folder="cifar-10-batches-bin", tarball="cifar-10-binary.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar.html",
        splits={"train": tuple(f"data_batch_{k}.bin" for k in range(1, 6)), "test": ("test_batch.bin",)},
        names_file="batches.meta.txt", num_classes=10,
        pickle_folder="cifar-10-batches-py", pickle_tarball="cifar-10-python.tar.gz",
    ),
    "cifar100": OfficialFormat(
        name="cifar100", title="CIFAR-100", folder="cifar-100-binary", tarball="cifar-100-binary.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar.html",
        splits={"train": ("train.bin",), "test": ("test.bin",)},
        names_file="fine_label_names.txt", num_classes=100,
        pickle_folder="cifar-100-python", pickle_tarball="cifar-100-python.tar.gz",
    ),
    "stl10": OfficialFormat(
        name="stl10", title="STL-10", folder="stl10_binary", tarball="stl10_binary.tar.gz",
        url="https://cs.stanford.edu/~acoates/stl10/",
        splits={"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")},
        names_file="class_names.txt", num_classes=10,
    ),
}


def _record_size(fmt: OfficialFormat, file: str) -> int | None:
    """Bytes per record of a data file, ``None`` for text files."""
    if file == fmt.names_file:
        return None
    if fmt.name == "cifar10":
        return 1 + _CIFAR_PIXELS  # label byte + R, G, B planes
    if fmt.name == "cifar100":
        return 2 + _CIFAR_PIXELS  # coarse label byte + fine label byte + planes
    return _STL_PIXELS if file.endswith("_X.bin") else 1


def check_split(fmt: OfficialFormat, split: str) -> None:
    if split not in fmt.splits:
        raise ValueError(f"{fmt.name}: unknown split {split!r}; choose one of {', '.join(map(repr, fmt.splits))}")


class _Records:
    """Fixed-size uint8 records of one file as an ``(n, record_size)`` array.

    Extracted files are memory-mapped (opened lazily, and re-opened after unpickling so DataLoader workers
    started with spawn/forkserver don't get a copy of the whole file); tarball members are held as the bytes
    read from the archive, since a gzip stream can't be mapped.
    """

    def __init__(self, source: str, record_size: int, count: int, path: Path | None = None,
                 data: bytes | None = None):
        self.source = source  # what error messages call this file
        self.record_size = record_size
        self.count = count
        self._path = path
        self._array = None if data is None else np.frombuffer(data, dtype=np.uint8).reshape(count, record_size)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self._path, dtype=np.uint8, mode="r", shape=(self.count, self.record_size))
        return self._array

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> np.ndarray:
        return self.array[i]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._path is not None:
            state["_array"] = None
        return state


def _checked_count(source: str, size: int, record_size: int) -> int:
    """Number of records in a file of ``size`` bytes; a partial record means a truncated download."""
    if size == 0:
        raise ValueError(f"{source} is empty (a truncated or failed download?)")
    if size % record_size:
        raise ValueError(f"{source} is {size} bytes, not a multiple of the {record_size}-byte record "
                         f"({size // record_size} records + {size % record_size} bytes): truncated download?")
    return size // record_size


def _parse_names(source: str, text: str, expected: int) -> list[str]:
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != expected:
        raise ValueError(f"{source} lists {len(names)} class names, expected {expected}")
    return names


def _read_dir(fmt: OfficialFormat, folder: Path, files: Sequence[str]) -> dict[str, _Records | str]:
    for f in files:  # every file is checked before any is opened
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{fmt.name}: expected file {folder / f} (official binary version from {fmt.url})")
    sizes = {f: _record_size(fmt, f) for f in files}
    counts = {f: _checked_count(str(folder / f), (folder / f).stat().st_size, size)
              for f, size in sizes.items() if size is not None}
    return {f: (folder / f).read_text(encoding="utf-8") if size is None
            else _Records(str(folder / f), size, counts[f], path=folder / f)
            for f, size in sizes.items()}


def _strip_dot(member_name: str) -> str:
    while member_name.startswith("./"):
        member_name = member_name[2:]
    return member_name


def _member_file(member_name: str, folder: str) -> str | None:
    """The file name of a tarball member inside ``folder`` (or at the archive's top level), else ``None``."""
    name = _strip_dot(member_name)
    if name.startswith(folder + "/"):
        name = name[len(folder) + 1:]
    return None if "/" in name or not name else name


def _read_tar(fmt: OfficialFormat, tar_path: Path, files: Sequence[str]) -> dict[str, _Records | str]:
    """Read the wanted members in one sequential pass.

    A gzip stream only reads forwards cheaply, so members are taken in archive order as they come and the pass
    stops once all are found; each member's size is checked before its bytes are read.
    """
    wanted = set(files)
    out: dict[str, _Records | str] = {}
    saw_pickle_version = False
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar:
                file = _member_file(member.name, fmt.folder)
                if file in wanted and file not in out and member.isfile():
                    source = f"{tar_path}:{member.name}"
                    record_size = _record_size(fmt, file)
                    if record_size is None:
                        out[file] = tar.extractfile(member).read().decode("utf-8")
                    else:
                        count = _checked_count(source, member.size, record_size)
                        out[file] = _Records(source, record_size, count, data=tar.extractfile(member).read())
                    if len(out) == len(wanted):
                        break
                elif fmt.pickle_folder and _strip_dot(member.name).startswith(fmt.pickle_folder + "/"):
                    saw_pickle_version = True
                    break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ValueError(f"{tar_path}: cannot read the tar archive ({exc}); truncated download?") from exc
    if saw_pickle_version:
        raise pickle_error(fmt, tar_path)
    for f in files:
        if f not in out:
            raise FileNotFoundError(f"{fmt.name}: expected member {fmt.folder}/{f} inside {tar_path} "
                                    f"(official binary version from {fmt.url})")
    return out


def pickle_error(fmt: OfficialFormat, where: Path) -> ValueError:
    return ValueError(
        f"{where} is the {fmt.title} 'python version' (pickle files), which mmkd refuses to load because "
        f"unpickling can run arbitrary code; download the 'binary version' {fmt.tarball} from {fmt.url} and pass "
        f"it (or the extracted {fmt.folder}/ folder) instead"
    )


def is_pickle_layout(fmt: OfficialFormat, path: Path) -> bool:
    if fmt.pickle_folder is None:
        return False
    if path.is_file():
        return path.name == fmt.pickle_tarball
    if path.name == fmt.pickle_folder or (path / fmt.pickle_folder).is_dir() or (path / fmt.pickle_tarball).is_file():
        return True
    # The python version's own files, in a renamed folder.
    markers = ("batches.meta", "data_batch_1") if fmt.name == "cifar10" else ("meta", "train")
    return all((path / m).is_file() for m in markers)


def _locate_official(fmt: OfficialFormat, path: Path) -> tuple[str, Path]:
    """``("dir", folder)`` or ``("tar", tarball)`` for a data_dir given as the folder, its parent or the tarball."""
    if not path.exists():
        raise FileNotFoundError(f"{fmt.name}: data_dir {path} does not exist; expected the {fmt.folder}/ folder, "
                                f"its parent, or {fmt.tarball} (official binary version from {fmt.url})")
    if path.is_file():
        if is_pickle_layout(fmt, path):
            raise pickle_error(fmt, path)
        if not tarfile.is_tarfile(path):
            raise ValueError(f"{fmt.name}: data_dir {path} is a file but not a tar archive; expected the "
                             f"{fmt.folder}/ folder, its parent, or {fmt.tarball}")
        return "tar", path
    if path.name == fmt.folder or (path / fmt.names_file).is_file():
        return "dir", path
    if (path / fmt.folder).is_dir():
        return "dir", path / fmt.folder
    if (path / fmt.tarball).is_file():
        return "tar", path / fmt.tarball
    if is_pickle_layout(fmt, path):
        raise pickle_error(fmt, path)
    raise FileNotFoundError(f"{fmt.name}: expected {path / fmt.folder} (or {path / fmt.tarball}), the official "
                            f"binary version from {fmt.url}")


def load_official(fmt: OfficialFormat, path: Path, split: str) -> ClassificationDataset:
    check_split(fmt, split)
    kind, where = _locate_official(fmt, path)
    files = (*fmt.splits[split], fmt.names_file)
    read = _read_dir if kind == "dir" else _read_tar
    contents = read(fmt, where, files)
    names_source = str(where / fmt.names_file) if kind == "dir" else f"{where}:{fmt.folder}/{fmt.names_file}"
    raw_names = _parse_names(names_source, contents[fmt.names_file], fmt.num_classes)
    classnames = [n.replace("_", " ") for n in raw_names]
    if fmt.name == "stl10":
        x_file, y_file = fmt.splits[split]
        return _Stl10Binary(fmt.name, classnames, contents[x_file], contents[y_file])
    label_byte = 0 if fmt.name == "cifar10" else 1  # CIFAR-100: byte 0 is the coarse label, byte 1 the fine
    return _CifarBinary(fmt.name, classnames, [contents[f] for f in fmt.splits[split]], label_byte)


class _CifarBinary(ClassificationDataset):
    """CIFAR-10/100 binary records: label byte(s), then 1024 R, 1024 G, 1024 B bytes, each plane row-major."""

    def __init__(self, name: str, classnames: list[str], parts: list[_Records], label_byte: int):
        super().__init__(name, classnames)
        self._parts = parts
        self._ends = np.cumsum([len(p) for p in parts]).tolist()
        self._label_byte = label_byte

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _item(self, i: int) -> tuple[Image.Image, int]:
        k = bisect.bisect_right(self._ends, i)
        j = i - (self._ends[k - 1] if k else 0)
        record = self._parts[k][j]
        # Labels are checked per record: validating up front would read every page of the file.
        label = self._check_label(int(record[self._label_byte]), f"{self._parts[k].source} record {j}")
        pixels = record[-_CIFAR_PIXELS:].reshape(3, 32, 32).transpose(1, 2, 0)  # CHW -> HWC
        return Image.fromarray(np.ascontiguousarray(pixels)), label


class _Stl10Binary(ClassificationDataset):
    """STL-10 binary: X holds 3x96x96 images with each channel plane column-major; y holds labels 1..10."""

    def __init__(self, name: str, classnames: list[str], images: _Records, labels: _Records):
        super().__init__(name, classnames)
        if len(images) != len(labels):
            raise ValueError(f"{images.source} holds {len(images)} images but {labels.source} holds "
                             f"{len(labels)} labels")
        y = np.asarray(labels.array[:, 0], dtype=np.int64)  # one byte per image: small enough to check now
        bad = np.flatnonzero((y < 1) | (y > len(classnames)))
        if bad.size:
            raise ValueError(f"{labels.source}: label {int(y[bad[0]])} at index {int(bad[0])} is outside "
                             f"1..{len(classnames)}")
        self._images = images
        self._labels = y - 1

    def __len__(self) -> int:
        return len(self._images)

    def _item(self, i: int) -> tuple[Image.Image, int]:
        # Equivalent to the official reader's reshape (N, 3, 96, 96) + transpose (0, 3, 2, 1) for one image:
        # the stored plane index is [channel, column, row].
        pixels = self._images[i].reshape(3, 96, 96).transpose(2, 1, 0)
        return Image.fromarray(np.ascontiguousarray(pixels)), int(self._labels[i])


def official_layout(path: Path) -> OfficialFormat | None:
    """The official format a bare path holds (the folder, its parent, or the tarball), if any."""
    matches = []
    for fmt in FORMATS.values():
        if path.is_file():
            hit = path.name == fmt.tarball
        else:
            hit = path.name == fmt.folder or (path / fmt.folder).is_dir() or (path / fmt.tarball).is_file()
        if hit:
            matches.append(fmt)
    if len(matches) > 1:
        names = ", ".join(f.name for f in matches)
        raise ValueError(f"{path} holds several official datasets ({names}); pass name= one of them and "
                         f"data_dir={str(path)!r}")
    return matches[0] if matches else None
