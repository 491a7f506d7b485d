"""Which formats a student folder holds, and the model card's section that lists them.

A CLIP student folder is always a transformers ``CLIPModel``; the exports can be written into it, so that one
Hub repository serves every runtime:

==========================  ==================================================================  ===================
format                      written by                                                          files
==========================  ==================================================================  ===================
transformers                the recipes                                                         ``model.safetensors``, ``config.json``, processor files
open_clip                   ``mmkd export --format open_clip DIR DIR``                          ``open_clip_config.json``, ``open_clip_model.safetensors``
sentence-transformers       ``mmkd export --format sentence-transformers DIR OUT``              ``modules.json`` (the folder stays a transformers one)
ONNX fp32 / int8            ``mmkd export --format onnx [--int8] DIR DIR/onnx``                 ``onnx/*.onnx``, ``onnx/mmkd_onnx.json``, processor files
==========================  ==================================================================  ===================

:func:`formats_section` renders the card's "Formats" section from what the folder holds (with the int8 export's
measured size, speed and accuracy delta from ``onnx/mmkd_onnx.json``); it sits between :data:`BEGIN` and
:data:`END`, so :func:`update_formats_section` can rewrite it when a push finds new exports
(:func:`mmkd.hub.ensure_model_card`). A match student (``ResNetMiniLMMatcher``) has one format, mmkd's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BEGIN = "<!-- mmkd:formats -->"
END = "<!-- /mmkd:formats -->"
#: the sub-folder of a student folder that holds its ONNX export (pushed with it)
ONNX_SUBFOLDER = "onnx"


def onnx_folder(folder: str | Path) -> Path | None:
    """``folder/onnx`` when it holds an mmkd ONNX export (its metadata file), else None."""
    from mmkd.interop.to_onnx import METADATA_FILE

    sub = Path(folder) / ONNX_SUBFOLDER
    return sub if (sub / METADATA_FILE).is_file() else None


def available_formats(folder: str | Path) -> list[str]:
    """The formats ``folder`` holds, in the order the card lists them: ``transformers``, ``open_clip``,
    ``sentence-transformers``, ``onnx``, ``onnx-int8`` (a match student: ``mmkd``)."""
    from mmkd.interop.to_onnx import IMAGE_FILE, INT8_SUFFIX, TEXT_FILE
    from mmkd.interop.to_open_clip import CONFIG_NAME, WEIGHTS_NAME

    folder = Path(folder)
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type == "mmkd_resnet_minilm":
        return ["mmkd"]
    found = ["transformers"] if model_type == "clip" else []
    if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
        found.append("open_clip")
    if (folder / "modules.json").is_file():
        found.append("sentence-transformers")
    onnx = onnx_folder(folder)
    if onnx is not None:
        if all((onnx / f).is_file() for f in (IMAGE_FILE, TEXT_FILE)):
            found.append("onnx")
        if all((onnx / f.replace(".onnx", INT8_SUFFIX)).is_file() for f in (IMAGE_FILE, TEXT_FILE)):
            found.append("onnx-int8")
    return found


_ROWS = {
    "transformers": ("transformers (PyTorch)", "`model.safetensors`, `config.json`, the processor files",
                     '`CLIPModel.from_pretrained("{repo}")`, `pipeline("zero-shot-image-classification", '
                     'model="{repo}")`'),
    "open_clip": ("open_clip", "`open_clip_config.json`, `open_clip_model.safetensors`",
                  '`open_clip.create_model_and_transforms("hf-hub:{repo}")`'),
    "sentence-transformers": ("sentence-transformers", "`modules.json`, `config_sentence_transformers.json`",
                              '`SentenceTransformer("{repo}")`, then `.encode([image])` and `.encode(["a caption"])`'),
    "onnx": ("ONNX fp32 (onnxruntime)", "`onnx/image_encoder.onnx`, `onnx/text_encoder.onnx`",
             "onnxruntime, below"),
    "onnx-int8": ("ONNX int8 (onnxruntime)", "`onnx/image_encoder.int8.onnx`, `onnx/text_encoder.int8.onnx`",
                  "onnxruntime, below"),
    "mmkd": ("mmkd `ResNetMiniLMMatcher` (PyTorch)", "`model.safetensors`, `config.json`, the tokenizer files",
             '`ResNetMiniLMMatcher.from_pretrained("{repo}")` (`pip install mmkd`)'),
}

_ONNX_SNIPPET = """```python
# needs onnxruntime and transformers (for the tokenizer and image processor), not mmkd
import onnxruntime as ort
from huggingface_hub import snapshot_download
from transformers import CLIPProcessor

folder = snapshot_download("{repo}", allow_patterns=["onnx/*"]) + "/onnx"
processor = CLIPProcessor.from_pretrained(folder)
images = ort.InferenceSession(f"{{folder}}/image_encoder{suffix}.onnx")
texts = ort.InferenceSession(f"{{folder}}/text_encoder{suffix}.onnx")
image_embeds = images.run(None, {{"pixel_values": processor(images=[image], return_tensors="np")["pixel_values"]}})[0]
tokens = processor(text=["a photo of a sneaker"], padding=True, return_tensors="np")
text_embeds = texts.run(None, {{"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}})[0]
```

The outputs are the raw projected embeddings (`CLIPModel.get_image_features` / `get_text_features`); normalise
them before taking cosines. Batch size and caption length are dynamic."""


def _int8_lines(report: dict[str, Any] | None) -> list[str]:
    """The int8 subsection: the export's measured size, speed and accuracy delta against the fp32 export."""
    lines = ["", "### ONNX int8", "",
             "onnxruntime's dynamic quantization (`quant_pre_process`, then `quantize_dynamic`: int8 weights of the "
             "MatMul and Gemm nodes, activations quantized at run time) of the fp32 export; no calibration data."]
    if report is None:
        return lines + ["", "Its size, speed and accuracy were not measured at export (`mmkd export --format onnx "
                            "--int8` measures them)."]
    size, img, txt = report["size_mb"], report["image_per_s"], report["text_per_s"]
    cos = report["min_cosine_to_fp32"]
    lines += [
        "",
        "| | ONNX fp32 | ONNX int8 | int8 / fp32 |",
        "|---|---|---|---|",
        f"| size of the two encoders (MB) | {size['fp32']:.1f} | {size['int8']:.1f} | {size['int8'] / size['fp32']:.2f}× |",
        f"| images/s (batch {report['batch_size']}) | {img['fp32']:.1f} | {img['int8']:.1f} | "
        f"{img['int8'] / img['fp32']:.2f}× |",
        f"| captions/s (batch {report['batch_size']}, {report['text_length']} tokens) | {txt['fp32']:.1f} | "
        f"{txt['int8']:.1f} | {txt['int8'] / txt['fp32']:.2f}× |",
    ]
    acc = report.get("accuracy")
    if acc is not None:
        delta = 100 * (acc["int8_acc1"] - acc["fp32_acc1"])
        lines.append(f"| zero-shot acc@1 on {acc['dataset']}, {acc['num_images']:,} images (%) | "
                     f"{100 * acc['fp32_acc1']:.2f} | {100 * acc['int8_acc1']:.2f} | {delta:+.2f} points |")
    lines += ["", f"Measured at export with onnxruntime's CPU execution provider ({report['hardware']}); speed on "
              "synthetic inputs, the median of interleaved batches. The lowest cosine between the int8 and fp32 "
              f"embeddings of real photos and captions: {cos['image']:.4f} (images), {cos['text']:.4f} (captions)."
              + (" Zero-shot accuracy was not measured at export (`--eval-dataset` measures it)." if acc is None
                 else "")]
    return lines


def formats_section(folder: str | Path, repo_id: str) -> str:
    """The card's "Formats" section for ``folder`` (published as ``repo_id``), between :data:`BEGIN` / :data:`END`."""
    from mmkd.interop.to_onnx import METADATA_FILE

    formats = available_formats(folder)
    lines = [BEGIN, "## Formats", "", "| format | files | loads with |", "|---|---|---|"]
    lines += [f"| {name} | {files} | {how.format(repo=repo_id)} |" for name, files, how in
              (_ROWS[f] for f in formats)]
    if "onnx" in formats or "onnx-int8" in formats:
        suffix = ".int8" if "onnx-int8" in formats else ""
        lines += ["", _ONNX_SNIPPET.format(repo=repo_id, suffix=suffix)]
    if "onnx-int8" in formats:
        meta = json.loads((Path(folder) / ONNX_SUBFOLDER / METADATA_FILE).read_text(encoding="utf-8"))
        lines += _int8_lines(meta.get("int8_report"))
    return "\n".join([*lines, END])


def update_formats_section(card: str, folder: str | Path, repo_id: str) -> str:
    """``card`` with its formats section rendered afresh from ``folder``; a card without one gets it before its
    "## Evaluation" heading (else at the end)."""
    section = formats_section(folder, repo_id)
    start, end = card.find(BEGIN), card.find(END)
    if start != -1 and end > start:
        return card[:start] + section + card[end + len(END):]
    anchor = card.find("\n## Evaluation")
    if anchor == -1:
        return card.rstrip("\n") + "\n\n" + section + "\n"
    return card[:anchor] + "\n" + section + "\n" + card[anchor:]
