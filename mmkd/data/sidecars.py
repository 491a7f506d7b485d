"""Streaming teacher embeddings: one sidecar file per webdataset shard, and a training stream that reads both.

MobileCLIP's dataset reinforcement (Vasu et al., 2024) stores a teacher's outputs beside the images once and trains
from them for every later epoch. For a webdataset (img2dataset's ``.tar`` shards of ``<key>.jpg`` / ``<key>.txt``),
:func:`build_sidecars` writes ``<sidecar_dir>/<shard name>.teacher.safetensors`` per shard: the teacher's image and
text embeddings of every readable sample, their keys, and the key of the file itself. :func:`stream_with_sidecars`
returns a ``datasets.IterableDataset`` that reads each tar and its sidecar together and yields rows with
``teacher_image_embeds`` / ``teacher_text_embeds`` columns, which :class:`~mmkd.data.CLIPDistillationCollator` and
the trainer use instead of running the teacher.

**Keyed and refused when stale**, like :mod:`mmkd.data.cache`: a sidecar records the teacher's name, backend and
weight hash, its preprocessing and tokenizer signatures, the view settings, and the shard's name, size, modification
time and a SHA-256 of its first and last 64 KiB. A sidecar that does not match — another teacher, other views, a tar
rewritten since — is refused with :class:`~mmkd.data.cache.StaleCacheError` naming the shard and what differs, at
build time and before training starts; a sample the tar holds but its sidecar does not is refused too.

**Built by all ranks in parallel, resumable per shard**: under a multi-process launch shard ``i`` is built by rank
``i % world_size``; each sidecar is written under a temporary name and renamed when complete, so a kill loses at
most the shards in flight, and a re-run skips every shard whose sidecar is complete and current.

**Augmented views** (``ViewSpec(views=K)``): caching the teacher's embedding of one deterministic view is wrong
for a student trained on random crops. With ``K > 0`` the builder draws K views per image — a random resized crop
(torchvision's ``RandomResizedCrop.get_params``, seeded by the sample's key) and a horizontal flip — computes the
teacher's embedding of each, and stores the crop boxes and flips. The stream picks one view per sample and epoch
(from the data loader's per-worker torch RNG, so reproducible under the run's seed) and yields its embedding and its
parameters (``view`` column); the collator cuts exactly that view out of the image for the student
(:func:`apply_view`, the one function both sides use). The view is the box resized to the teacher's input size
(``size``) and flipped; the student's processor then only rescales it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmkd.data.cache import IMAGE_COLUMN, TEXT_COLUMN, StaleCacheError, teacher_identity

if TYPE_CHECKING:
    from mmkd.teachers import FrozenTeacher

logger = logging.getLogger(__name__)

SUFFIX = ".teacher.safetensors"
FORMAT_VERSION = 1
VIEW_COLUMN = "view"  # [top, left, height, width, flip, size] of the sampled view, int32


@dataclass(frozen=True)
class ViewSpec:
    """Which teacher views a sidecar holds. ``views=0``: the teacher's deterministic validation view only."""

    views: int = 0
    scale: tuple[float, float] = (0.35, 1.0)  # RandomResizedCrop's area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # and its aspect-ratio range
    flip: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.views < 0:
            raise ValueError(f"views={self.views}: must be >= 0")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale={self.scale}: need 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio={self.ratio}: need 0 < low <= high")


def sidecar_path(shard: str | os.PathLike, sidecar_dir: str | os.PathLike) -> Path:
    return Path(sidecar_dir) / f"{Path(shard).name}{SUFFIX}"


ENDS = 1 << 16  # bytes hashed at each end of a shard: catches a rewrite that kept size and modification time


def _shard_state(shard: str) -> dict[str, Any]:
    stat = os.stat(shard)
    digest = hashlib.sha256()
    with open(shard, "rb") as f:
        digest.update(f.read(ENDS))
        f.seek(max(0, stat.st_size - ENDS))
        digest.update(f.read(ENDS))
    return {"name": Path(shard).name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "ends_sha256": digest.hexdigest()}


def _input_size(inputs) -> int:
    """The teacher's input resolution, read off its own preprocessing."""
    from PIL import Image

    return int(inputs.images([Image.new("RGB", (8, 8))]).shape[-1])


def teacher_key(teacher: FrozenTeacher, inputs, spec: ViewSpec) -> dict[str, Any]:
    """What every sidecar of one build depends on (computed once: the weight hash reads every weight)."""
    key = {
        "format_version": FORMAT_VERSION,
        **teacher_identity(teacher, inputs),
        "views": asdict(spec) if spec.views else {"views": 0},  # crop settings matter only with views
        "view_size": _input_size(inputs),
    }
    return json.loads(json.dumps(key))


def sidecar_key(base: dict[str, Any], shard: str) -> dict[str, Any]:
    """A shard's sidecar key: :func:`teacher_key` plus the shard file's name, size and modification time."""
    return {**base, "shard": _shard_state(shard)}


def _read_key(path: Path) -> dict[str, Any] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["mmkd"])
    except Exception:  # noqa: BLE001 -- a torn or foreign file is treated as no sidecar: rebuilt, never trusted
        return None


def check_sidecar(path: Path, key: dict[str, Any], shard: str, stored: dict[str, Any] | None = None) -> None:
    """Raise :class:`StaleCacheError` naming the shard and each field where the sidecar differs from ``key``
    (``stored``: its key, if already read)."""
    stored = stored if stored is not None else _read_key(path)
    if stored is None:
        raise StaleCacheError(f"{path}: no readable teacher sidecar for shard {shard} (build it with "
                              "mmkd.data.sidecars.build_sidecars)")
    diffs = [k for k in sorted(set(key) | set(stored)) if key.get(k) != stored.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: sidecar has {stored.get(k)!r}, now {key.get(k)!r}" for k in diffs)
        raise StaleCacheError(f"teacher sidecar {path} is stale for shard {shard} ({detail}); delete it (or "
                              "choose another sidecar_dir) to compute the embeddings again")


def view_params(key: str, spec: ViewSpec, width: int, height: int) -> list[list[int]]:
    """The ``[top, left, height, width, flip]`` of each of the ``spec.views`` views of the sample ``key`` (an image of
    ``width`` x ``height``): seeded by the spec's seed and the key, so a rebuild draws the same views."""
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    seed = int.from_bytes(hashlib.sha256(f"{spec.seed}/{key}".encode()).digest()[:8], "little") >> 1
    stand_in = Image.new("L", (width, height))  # get_params reads only the size
    views = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(spec.views):
            top, left, h, w = RandomResizedCrop.get_params(stand_in, list(spec.scale), list(spec.ratio))
            flip = int(spec.flip and torch.rand(()) < 0.5)
            views.append([top, left, h, w, flip])
    return views


def apply_view(image, view: Sequence[int]):
    """Cut the view ``[top, left, height, width, flip, size]`` out of a PIL image: the box resized to ``size`` x
    ``size`` (bicubic, antialiased), then mirrored if ``flip``. Builder (teacher side) and collator (student side)
    both call this, so the student sees exactly the pixels the teacher's embedding was computed on."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    top, left, height, width, flip, size = (int(v) for v in view)
    out = TF.resized_crop(image.convert("RGB"), top, left, height, width, [size, size],
                          interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.hflip(out) if flip else out


def _samples(shard: str, report) -> Iterator[dict[str, Any]]:
    """The readable samples of a tar, through the Conceptual Captions reader's bad-row filter."""
    from mmkd.data.conceptual_captions import _shard_rows

    yield from _shard_rows(shard, None, report)


def _decode(row: dict[str, Any]):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")


@torch.no_grad()
def _embed_images(teacher, inputs, images: list, device) -> torch.Tensor:
    return teacher.encode_image(inputs.images(images).to(device)).float().cpu()  # (n, E)


@torch.no_grad()
def _embed_texts(teacher, inputs, texts: list[str], device) -> torch.Tensor:
    tokens = {k: v.to(device) for k, v in inputs.texts(texts).items()}
    return teacher.encode_text(tokens["input_ids"], tokens.get("attention_mask")).float().cpu()  # (n, E)


def _build_one(shard: str, path: Path, key: dict, teacher, inputs, spec: ViewSpec, size: int, batch_size: int,
               device, strict: bool, tag: str) -> int:
    from safetensors.torch import save_file

    from mmkd.data.baddata import BadDataReport

    report = BadDataReport(strict=strict)
    keys: list[str] = []
    image_parts, text_parts, view_parts = [], [], []
    pending: list[tuple[str, Any, str]] = []

    def flush():
        if not pending:
            return
        if spec.views:
            params = [[[*v, size] for v in view_params(k, spec, *img.size)] for k, img, _ in pending]
            views = [apply_view(img, v) for (_, img, _), ps in zip(pending, params, strict=True) for v in ps]
            image = _embed_images(teacher, inputs, views, device)
            image_parts.append(image.reshape(len(pending), spec.views, -1))  # (b, K, E)
            view_parts.append(torch.tensor(params, dtype=torch.int32))  # (b, K, 6)
        else:
            image_parts.append(_embed_images(teacher, inputs, [img for _, img, _ in pending], device))  # (b, E)
        text_parts.append(_embed_texts(teacher, inputs, [t for _, _, t in pending], device))  # (b, E)
        keys.extend(k for k, _, _ in pending)
        pending.clear()

    per_batch = max(1, batch_size // max(1, spec.views))  # images per teacher call: K views each
    for row in _samples(shard, report):
        pending.append((row["key"], _decode(row), row["text"]))
        if len(pending) >= per_batch:
            flush()
    flush()
    if len(set(keys)) != len(keys):
        raise ValueError(f"{shard}: sample keys repeat; a sidecar needs one key per sample")
    tensors = {IMAGE_COLUMN: torch.cat(image_parts) if image_parts else torch.empty(0),
               TEXT_COLUMN: torch.cat(text_parts) if text_parts else torch.empty(0)}
    if spec.views:
        tensors[VIEW_COLUMN] = torch.cat(view_parts) if view_parts else torch.empty(0, dtype=torch.int32)
    tmp = path.with_name(f"{path.name}.tmp-{tag}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"mmkd": json.dumps(key), "keys": json.dumps(keys)})
    os.replace(tmp, path)
    report.log_summary(f"teacher sidecar of {shard}")
    return len(keys)


def build_sidecars(
    shards,
    teacher: FrozenTeacher,
    sidecar_dir: str | os.PathLike,
    *,
    spec: ViewSpec = ViewSpec(),
    batch_size: int = 256,
    accelerator=None,
    strict: bool = False,
) -> dict[str, int]:
    """Write (or find current) the teacher sidecar of every shard; returns counts of shards built and reused and of
    samples embedded. ``shards``: a folder, glob, ``{000..099}`` pattern or list (:func:`resolve_shards`)."""
    from mmkd.data.webdataset import resolve_shards

    shards = resolve_shards(shards)
    names = [Path(s).name for s in shards]
    if len(set(names)) != len(names):
        raise ValueError("shards: two shards share a file name; their sidecars would collide in one sidecar_dir")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    Path(sidecar_dir).mkdir(parents=True, exist_ok=True)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else teacher.device
    inputs = teacher.inputs()
    base = teacher_key(teacher, inputs, spec)
    size = base["view_size"]
    counts = {"shards": len(shards), "built": 0, "reused": 0, "samples": 0}
    for i, shard in enumerate(shards):
        if i % world != rank:
            continue
        path = sidecar_path(shard, sidecar_dir)
        key = sidecar_key(base, shard)
        stored = _read_key(path) if path.exists() else None
        if stored is not None:
            check_sidecar(path, key, shard, stored)  # current: reuse it; stale: refuse, naming what differs
            counts["reused"] += 1
            continue
        counts["samples"] += _build_one(shard, path, key, teacher, inputs, spec, size, batch_size, device, strict,
                                        tag=f"{rank}-{os.getpid()}")
        counts["built"] += 1
        logger.info("teacher sidecar %d/%d: %s", i + 1, len(shards), path)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return counts


def _load(path: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = json.loads(f.metadata()["keys"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 -- safe_open has no __iter__
    return {k: i for i, k in enumerate(keys)}, tensors


def _generate(shards: list[str], sidecars: list[str], strict: bool):
    from mmkd.data.baddata import BadDataReport

    report = BadDataReport(strict=strict)
    for shard, path in zip(shards, sidecars, strict=True):
        index, tensors = _load(Path(path))
        images, texts, views = tensors[IMAGE_COLUMN], tensors[TEXT_COLUMN], tensors.get(VIEW_COLUMN)
        for row in _samples(shard, report):
            i = index.get(row["key"])
            if i is None:
                raise StaleCacheError(f"{shard}, key {row['key']}: not in its teacher sidecar {path} (the shard "
                                      "changed since it was built); rebuild the sidecar")
            out = {"image": row["image"], "text": row["text"], "key": row["key"], TEXT_COLUMN: texts[i].tolist()}
            if views is None:
                out[IMAGE_COLUMN] = images[i].tolist()
            else:
                v = int(torch.randint(views.shape[1], ()))  # the loader's per-worker RNG: new views each epoch
                out[IMAGE_COLUMN] = images[i, v].tolist()
                out[VIEW_COLUMN] = views[i, v].tolist()
            yield out
    report.log_summary(f"webdataset with teacher sidecars ({len(shards)} shards)")


def stream_with_sidecars(
    shards,
    teacher: FrozenTeacher,
    sidecar_dir: str | os.PathLike,
    *,
    spec: ViewSpec = ViewSpec(),
    strict: bool = False,
):
    """A ``datasets.IterableDataset`` of the shards' samples with their teacher embeddings (and, with views, the
    ``view`` to cut for the student), one ``datasets`` shard per tar. Every sidecar is checked against ``teacher``
    and ``spec`` before the stream is returned, so a missing or stale one fails here, naming its shard."""
    import datasets

    from mmkd.data.webdataset import resolve_shards

    shards = resolve_shards(shards)
    base = teacher_key(teacher, teacher.inputs(), spec)
    sidecars = []
    for shard in shards:
        path = sidecar_path(shard, sidecar_dir)
        check_sidecar(path, sidecar_key(base, shard), shard)
        sidecars.append(str(path))
    features = {"image": datasets.Image(mode="RGB"), "text": datasets.Value("string"),
                "key": datasets.Value("string"), TEXT_COLUMN: datasets.Sequence(datasets.Value("float32")),
                IMAGE_COLUMN: datasets.Sequence(datasets.Value("float32"))}
    if spec.views:
        features[VIEW_COLUMN] = datasets.Sequence(datasets.Value("int32"))
    return datasets.IterableDataset.from_generator(
        _generate, features=datasets.Features(features),
        gen_kwargs={"shards": shards, "sidecars": sidecars, "strict": strict},
    )
