"""Export a transformers ``CLIPModel`` (an mmkd student) as two ONNX encoders that onnxruntime runs without mmkd.

:func:`export_onnx` writes into ``output_dir``:

* ``image_encoder.onnx`` -- ``pixel_values (batch, 3, H, W) float32 -> image_embeds (batch, E)``;
* ``text_encoder.onnx`` -- ``input_ids, attention_mask (batch, length) int64 -> text_embeds (batch, E)``, any
  length up to the model's positions;
* with ``int8=True``, ``image_encoder.int8.onnx`` / ``text_encoder.int8.onnx``: onnxruntime's dynamic int8
  quantization of the same graphs (``quant_pre_process``, then ``quantize_dynamic``: int8 weights of the MatMul and
  Gemm nodes; activations quantized at run time);
* ``mmkd_onnx.json``: the text context length, embedding size, exporter versions, the measured differences and,
  with ``int8``, the int8 report (:func:`int8_report`: sizes, onnxruntime speed and, with ``eval_dataset``, zero-shot
  accuracy of both, against the fp32 export), which the model card's int8 section shows;
* the model's tokenizer and image processor files (``save_pretrained``), so the folder is all a user needs::

      session = onnxruntime.InferenceSession("OUT/image_encoder.onnx")
      pixels = CLIPImageProcessor.from_pretrained("OUT")(images, return_tensors="np")["pixel_values"]
      image_embeds = session.run(None, {"pixel_values": pixels})[0]

Written into a student folder's ``onnx/`` (``mmkd export --format onnx --int8 DIR DIR/onnx``), the export is
pushed with the student and listed on its card (:mod:`mmkd.interop.formats`). The embeddings are the raw projected
features of ``CLIPModel.get_image_features`` / ``get_text_features`` (not normalised), batch and length dynamic. The exporter is ``torch.onnx.export(..., dynamo=True)``: torch's maintained
exporter (``torch.export`` + onnxscript; the TorchScript-based one is deprecated), which handles transformers'
SDPA attention and the dynamic text length directly; optimum's exporter wraps the same torch call for CLIP and
adds a dependency, so it is not used.

The export is checked before anything is written to ``output_dir``: onnxruntime's embeddings of real photos
(scikit-learn's sample images) and captions of different lengths, at batch 1 and 3, must equal the
``CLIPModel``'s to ``1e-4`` (relative to the embedding scale), or ``RuntimeError`` names the tower and the difference.
Files are written in a temporary folder beside ``output_dir`` and moved in only when all checks pass.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

IMAGE_FILE = "image_encoder.onnx"
METADATA_FILE = "mmkd_onnx.json"  # context length, embedding size, exporter versions
TEXT_FILE = "text_encoder.onnx"
INT8_SUFFIX = ".int8.onnx"
TOLERANCE = 1e-4
CHECK_CAPTIONS = ["a photo of a temple", "a flower", "a close-up photo of a pink flower in a garden on a sunny day"]


class _ImageEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output


class _TextEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


class ONNXCLIP(nn.Module):
    """An export's two encoders in onnxruntime sessions (CPU execution provider), with ``CLIPModel``'s encoder
    methods, so code written for a ``CLIPModel`` (the compression report's timing, :class:`mmkd.eval.encoders.
    ONNXEncoder`) runs the export unchanged: :meth:`get_image_features` / :meth:`get_text_features` take and return
    tensors (the raw projected embeddings; the ``CLIPModel`` returns them as ``.pooler_output``).

    ``int8`` selects the ``*.int8.onnx`` copies; ``config`` (the source model's ``CLIPConfig``, optional) is kept
    as ``.config`` for code that reads the model's shapes. It has no parameters.

    ``spinning=False`` stops onnxruntime's worker threads from spin-waiting after each run (its default,
    ``session.intra_op.allow_spinning``, saves a little latency when onnxruntime has the cores to itself). Code
    that times onnxruntime interleaved with other work on the same cores turns it off: the spinning threads hold
    the cores after the call and starve whatever runs next (measured: a torch encoder timed right after an
    onnxruntime one ran 5-30x slower).
    """

    def __init__(self, folder: str | os.PathLike, *, int8: bool = False, config: Any | None = None,
                 spinning: bool = True):
        super().__init__()
        require_onnx()
        import onnxruntime as ort

        folder = Path(folder)
        self.folder, self.int8, self.config = folder, int8, config
        self.files = [folder / (f.replace(".onnx", INT8_SUFFIX) if int8 else f) for f in (IMAGE_FILE, TEXT_FILE)]
        missing = [str(f) for f in (*self.files, folder / METADATA_FILE) if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not an ONNX export of mmkd (missing {', '.join(missing)}); write "
                                    "one with `mmkd export --format onnx" + (" --int8" if int8 else "") + "`")
        self.metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
        options = ort.SessionOptions()
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.image_session, self.text_session = (
            ort.InferenceSession(str(f), options, providers=["CPUExecutionProvider"]) for f in self.files)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        px = pixel_values.detach().cpu().float().numpy()
        return torch.from_numpy(self.image_session.run(None, {"pixel_values": px})[0])

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        feed = {"input_ids": input_ids.cpu().long().numpy(), "attention_mask": mask.cpu().long().numpy()}
        return torch.from_numpy(self.text_session.run(None, feed)[0])

    def size_bytes(self) -> int:
        """Bytes of the two encoder files (what a deployment ships besides the small processor files)."""
        return sum(f.stat().st_size for f in self.files)


class MissingONNXError(RuntimeError):
    """onnx, onnxruntime or onnxscript is not installed (the ``onnx`` extra)."""


def require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if _missing(name)]
    if missing:
        raise MissingONNXError(f"ONNX export needs {', '.join(missing)}: pip install 'mmkd[onnx]'")


def _missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def check_images() -> list:
    """The real photos the export is checked on (scikit-learn's two sample images, and a crop of one)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    return [*photos, photos[0].crop((100, 50, 400, 300))]


def _sample_inputs(processor) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    pixels = processor.image_processor(check_images(), return_tensors="np")["pixel_values"]
    text = processor.tokenizer(CHECK_CAPTIONS, padding=True, return_tensors="np")
    return {"pixel_values": pixels.astype(np.float32)}, {k: text[k].astype(np.int64)
                                                         for k in ("input_ids", "attention_mask")}


def _compare(what: str, onnx_out: np.ndarray, torch_out: np.ndarray) -> float:
    scale = max(1.0, float(np.abs(torch_out).max()))
    diff = float(np.abs(onnx_out - torch_out).max())
    if not diff <= TOLERANCE * scale:
        raise RuntimeError(f"onnxruntime's {what} embeddings differ from the CLIPModel's by {diff:.3g} "
                           f"(> {TOLERANCE:g} x {scale:.3g}): not exporting")
    return diff


def _verify(folder: Path, model, image_inputs, text_inputs) -> dict[str, float]:
    """Run both exported graphs in onnxruntime at batch 1 and the full batch and compare with ``model``."""
    import onnxruntime as ort

    sessions = {name: ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])
                for name in (IMAGE_FILE, TEXT_FILE)}
    diffs = {}
    with torch.no_grad():
        expected_image = _ImageEncoder(model)(torch.from_numpy(image_inputs["pixel_values"])).numpy()
        expected_text = _TextEncoder(model)(*(torch.from_numpy(text_inputs[k])
                                             for k in ("input_ids", "attention_mask"))).numpy()
    for rows in (slice(0, 1), slice(None)):
        got = sessions[IMAGE_FILE].run(None, {k: v[rows] for k, v in image_inputs.items()})[0]
        diffs[f"image[{rows.stop or 'all'}]"] = _compare("image", got, expected_image[rows])
        ids = {k: v[rows] for k, v in text_inputs.items()}
        if rows.stop == 1:  # one caption at its own length: the dynamic length axis
            n = int(ids["attention_mask"].sum())
            ids = {k: v[:, :n] for k, v in ids.items()}
        got = sessions[TEXT_FILE].run(None, ids)[0]
        diffs[f"text[{rows.stop or 'all'}]"] = _compare("text", got, expected_text[rows])
    return diffs


def _export(module: nn.Module, args: tuple, names: list[str], dynamic: dict, output: str, path: Path) -> None:
    module.eval()  # the wrapper too: torch warns about exporting a module in training mode
    with warnings.catch_warnings():
        # torch names each dynamic axis once: "The axis name: batch will not be used, since it shares ..." is noise
        warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used", category=UserWarning)
        program = torch.onnx.export(module, args, dynamic_shapes=dynamic, input_names=names,
                                    output_names=[output], dynamo=True, verbose=False)
    program.save(str(path))


def _quantize(source: Path, target: Path) -> None:
    """onnxruntime's dynamic int8 quantization of ``source`` after its recommended pre-processing
    (``quant_pre_process``: ONNX shape inference and onnxruntime's basic graph optimisations; its symbolic shape
    inference is skipped, it cannot follow the dynamo graph's dynamic axes). Measured on the demo's distilled student:
    12 % faster at batch 1, the same at batch 32, the same Fashion-MNIST accuracy as without it."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    prepared = target.with_name(target.name + ".pre")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


def export_onnx(
    model_or_dir,
    output_dir: str | os.PathLike,
    *,
    processor: Any | None = None,
    int8: bool = False,
    measure: bool = True,
    eval_dataset: Any = None,
    data_dir: str | None = None,
    max_examples: int | None = None,
) -> dict[str, Any]:
    """Write the image and text encoders of a ``CLIPModel`` as ONNX (and int8 copies); returns the written paths,
    the measured differences against the ``CLIPModel`` and, with ``int8`` and ``measure``, the int8 report.

    The int8 report (:func:`int8_report`, also stored in ``mmkd_onnx.json`` under ``"int8_report"``, where the
    model card reads it) compares the int8 encoders with the fp32 ones: file sizes, onnxruntime images/s and
    captions/s at batch 32 on this machine, the lowest cosine between their embeddings of the check photos and
    captions, and -- with ``eval_dataset`` (anything the compression report takes: ``"fashion_mnist"``, a
    dataset name with ``data_dir``, an image folder) -- zero-shot acc@1 / acc@5 of both on it (at most
    ``max_examples`` images). The dataset is loaded before anything is exported. See the module docstring.
    """
    from transformers import CLIPModel, CLIPProcessor

    from mmkd.interop.to_open_clip import _check_student_dir

    require_onnx()
    if eval_dataset is not None and not (int8 and measure):
        raise ValueError("eval_dataset: the accuracy of the int8 encoders is measured with int8=True, measure=True")
    task = None
    if eval_dataset is not None:
        from mmkd.reporting.compression import check_dataset_name, load_report_dataset

        check_dataset_name(eval_dataset, data_dir)
        task = (str(eval_dataset), *load_report_dataset(eval_dataset, data_dir=data_dir, max_examples=max_examples))
    if isinstance(model_or_dir, CLIPModel):
        model = model_or_dir
        if processor is None:
            raise ValueError("export_onnx(model=CLIPModel, ...): pass processor= (a CLIPProcessor) as well")
    else:
        path = Path(model_or_dir)
        _check_student_dir(path)
        model = CLIPModel.from_pretrained(path)
        processor = processor or CLIPProcessor.from_pretrained(path)
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output_dir {str(out)!r} is a file")
    was_training, dtype = model.training, next(model.parameters()).dtype
    model = model.float().eval()  # exported in float32; a live model gets its dtype and mode back below
    image_inputs, text_inputs = _sample_inputs(processor)
    batch = torch.export.Dim("batch", min=1)
    length = torch.export.Dim("length", min=2, max=model.config.text_config.max_position_embeddings)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.onnx-", dir=out.parent))
    try:
        ids = {k: torch.from_numpy(v) for k, v in text_inputs.items()}
        _export(_ImageEncoder(model), (torch.from_numpy(image_inputs["pixel_values"]),), ["pixel_values"],
                {"pixel_values": {0: batch}}, "image_embeds", staging / IMAGE_FILE)
        _export(_TextEncoder(model), (ids["input_ids"], ids["attention_mask"]), ["input_ids", "attention_mask"],
                {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}, "text_embeds",
                staging / TEXT_FILE)
        diffs = _verify(staging, model, image_inputs, text_inputs)
        written = {"image": out / IMAGE_FILE, "text": out / TEXT_FILE}
        if int8:
            for name in (IMAGE_FILE, TEXT_FILE):
                target = staging / name.replace(".onnx", INT8_SUFFIX)
                _quantize(staging / name, target)
                written[f"{name.split('_')[0]}_int8"] = out / target.name
        processor.save_pretrained(staging)
        import onnx

        meta = {
            "context_length": int(model.config.text_config.max_position_embeddings),
            "projection_dim": int(model.config.projection_dim),
            "image_size": int(model.config.vision_config.image_size),
            "int8": int8, "exporter": "torch.onnx.export(dynamo=True)", "torch": torch.__version__,
            "onnx": onnx.__version__, "max_abs_diff": diffs, "int8_report": None}
        (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        if int8 and measure:  # on the complete export, as a user would load it
            meta["int8_report"] = report = int8_report(staging, model.config, task)
            (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        else:
            report = None
        out.mkdir(exist_ok=True)
        for item in staging.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        model.to(dtype).train(was_training)
    logger.info("ONNX encoders written to %s (max difference to the CLIPModel: %s)", out, diffs)
    return {"paths": written, "max_abs_diff": diffs, "int8_report": report}


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())


def int8_report(folder: str | os.PathLike, config: Any, task: tuple | None = None, *, batch_size: int = 32,
                repeats: int = 5) -> dict[str, Any]:
    """How an export's int8 encoders compare with its fp32 ones (``folder`` holds both; ``config`` is the source
    ``CLIPConfig``, for the synthetic timing inputs): sizes, onnxruntime throughput at ``batch_size`` (interleaved,
    median of ``repeats``; :func:`mmkd.reporting.throughput.compare_throughput`), the lowest cosine between their
    embeddings of the check photos and captions, and with ``task`` = ``(name, dataset, templates)`` zero-shot
    accuracy of both through :func:`mmkd.eval.zeroshot.evaluate_zeroshot`."""
    from transformers import CLIPProcessor

    from mmkd.reporting.hardware import hardware_description
    from mmkd.reporting.throughput import compare_throughput

    fp32, int8 = (ONNXCLIP(folder, int8=q, config=config, spinning=False) for q in (False, True))
    speeds = compare_throughput({"fp32": fp32, "int8": int8}, batch_size=batch_size, repeats=repeats, warmup=1)
    image_inputs, text_inputs = _sample_inputs(CLIPProcessor.from_pretrained(folder))
    px = torch.from_numpy(image_inputs["pixel_values"])
    ids, mask = (torch.from_numpy(text_inputs[k]) for k in ("input_ids", "attention_mask"))
    report: dict[str, Any] = {
        "size_mb": {"fp32": fp32.size_bytes() / 1e6, "int8": int8.size_bytes() / 1e6},
        "batch_size": batch_size,
        "text_length": speeds["fp32"]["text_length"],
        "image_per_s": {k: speeds[k]["image_per_s"] for k in ("fp32", "int8")},
        "text_per_s": {k: speeds[k]["text_per_s"] for k in ("fp32", "int8")},
        "min_cosine_to_fp32": {
            "image": _min_cosine(int8.get_image_features(px), fp32.get_image_features(px)),
            "text": _min_cosine(int8.get_text_features(ids, mask), fp32.get_text_features(ids, mask)),
        },
        "hardware": hardware_description(),
        "accuracy": None,
    }
    if task is not None:
        from mmkd.eval.zeroshot import evaluate_zeroshot

        name, ds, templates = task
        results = {k: evaluate_zeroshot(str(folder), ds, templates=templates, backend=backend, progress=False)
                   for k, backend in (("fp32", "onnxruntime"), ("int8", "onnxruntime-int8"))}
        report["accuracy"] = {"dataset": name, "num_images": results["fp32"]["num_images"],
                              **{f"{k}_{m}": results[k].get(m) for k in results for m in ("acc1", "acc5")}}
    return report
