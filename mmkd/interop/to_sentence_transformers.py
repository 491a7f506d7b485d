"""Export a CLIP student as a sentence-transformers model: ``SentenceTransformer(path)`` encodes PIL images and
strings into the student's embedding space, the form image-search tutorials use.

sentence-transformers' own ``models.CLIPModel`` module wraps a transformers ``CLIPModel`` and its processor and
saves them at the root of the folder, so the exported folder is at once a sentence-transformers model
(``modules.json``, ``config_sentence_transformers.json``, ``sentence_bert_config.json``) and the student's
transformers folder (``pipeline("zero-shot-image-classification")`` still loads it). The student's pushable run
records (``training_summary.json``, ``training_config.json``, evaluation results) are copied along, so ``mmkd push
OUT`` pushes it with the same model card as the student.

Checked before anything is written: the ``SentenceTransformer`` loaded back from the written files encodes real
photos (scikit-learn's sample images) and captions to the ``CLIPModel``'s raw projected embeddings within
``1e-5``; files are written in a staging folder beside ``output_dir`` and moved in only when they agree.

    model = SentenceTransformer("OUT")
    image_embeddings = model.encode([Image.open("cat.jpg")])
    text_embeddings = model.encode(["a photo of a cat"])
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TOLERANCE = 1e-5
RECORDS = ("training_summary.json", "training_config.json", "eval_results.json", "results.json")


def _reference(student_dir: Path, images, captions) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's raw projected embeddings, through the same wrappers the ONNX export traces."""
    from transformers import CLIPModel, CLIPProcessor

    from mmkd.interop.to_onnx import _ImageEncoder, _TextEncoder

    model, processor = CLIPModel.from_pretrained(student_dir).eval(), CLIPProcessor.from_pretrained(student_dir)
    tokens = processor.tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = _ImageEncoder(model)(processor(images=images, return_tensors="pt")["pixel_values"])
        text = _TextEncoder(model)(tokens["input_ids"], tokens["attention_mask"])
    return image, text


def _check(folder: Path, images, captions, expected: tuple[torch.Tensor, torch.Tensor]) -> float:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    got = (model.encode(images, convert_to_tensor=True), model.encode(captions, convert_to_tensor=True))
    worst = 0.0
    for what, a, b in zip(("image", "text"), got, expected, strict=True):
        diff = float((a.cpu() - b).abs().max())
        if not diff <= TOLERANCE * max(1.0, float(b.abs().max())):
            raise RuntimeError(f"sentence-transformers' {what} embeddings differ from the CLIPModel's by {diff:.3g}: "
                               "not exporting")
        worst = max(worst, diff)
    return worst


def export_sentence_transformers(student_dir: str | os.PathLike, output_dir: str | os.PathLike) -> dict:
    """Write ``student_dir`` (a CLIP student folder) as a sentence-transformers model in ``output_dir``; returns
    the written files and the largest embedding difference measured. See the module docstring."""
    from sentence_transformers import SentenceTransformer, models

    from mmkd.interop.to_onnx import CHECK_CAPTIONS, check_images
    from mmkd.interop.to_open_clip import _check_student_dir

    src, out = Path(student_dir), Path(output_dir)
    _check_student_dir(src)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir {str(out)!r} is a file")
    images = check_images()
    expected = _reference(src, images, CHECK_CAPTIONS)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.st-", dir=out.parent))
    try:
        SentenceTransformer(modules=[models.CLIPModel(str(src))], device="cpu").save(str(staging))
        (staging / "README.md").unlink(missing_ok=True)  # sentence-transformers' generic card: mmkd push writes ours
        for name in RECORDS:
            if (src / name).is_file():
                shutil.copy2(src / name, staging / name)
        worst = _check(staging, images, CHECK_CAPTIONS, expected)
        out.mkdir(exist_ok=True)
        written = sorted(p.name for p in staging.iterdir())
        for name in written:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"files": [out / name for name in written], "max_abs_diff": worst}
