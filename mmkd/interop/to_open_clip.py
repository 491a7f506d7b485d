"""Export a transformers ``CLIPModel`` (an mmkd student) as an open_clip checkpoint, weight for weight.

The inverse of :mod:`mmkd.interop.to_transformers`, through the same key table (:mod:`mmkd.interop.keymap`):
it puts a student back into the open_clip ecosystem (CLIP_benchmark, open_clip training code) without mmkd.
The export is exact -- open_clip's ``encode_image`` / ``encode_text`` equal the ``CLIPModel``'s features up to
float rounding -- or it does not happen: anything open_clip's ``CLIP`` cannot express raises ``ValueError``
naming it before any file is written.

:func:`export_open_clip` writes into ``output_dir``:

* ``open_clip_config.json`` -- ``{"model_cfg", "preprocess_cfg"}``, what open_clip's ``push_to_hf_hub``
  writes and its ``local-dir:`` / ``hf-hub:`` loaders read (architecture and preprocessing in one call)::

      model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUTPUT_DIR")
      tokenizer = open_clip.get_tokenizer("local-dir:OUTPUT_DIR")

* ``<model_name>.json`` -- the bare model config for ``open_clip.add_model_config`` (registered under its
  stem). No ``preprocess_cfg``: open_clip passes every key to ``CLIP(**cfg)`` and ignores preprocessing for a
  registered name loaded with ``pretrained=<file>``, so pass the values of ``open_clip_config.json``'s
  ``preprocess_cfg`` yourself on that route::

      open_clip.add_model_config("OUTPUT_DIR/mmkd-student.json")
      model, _, preprocess = open_clip.create_model_and_transforms(
          "mmkd-student", pretrained="OUTPUT_DIR/open_clip_model.safetensors",
          image_mean=..., image_std=..., image_interpolation=..., image_resize_mode=...)

* ``open_clip_model.safetensors`` -- the state dict (read directly by open_clip 3's ``load_checkpoint``; the
  first name its ``local-dir:`` loader looks for).

Command line: ``python -m mmkd.export STUDENT_DIR OUTPUT_DIR [--model-name NAME]``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel

from mmkd.interop.keymap import KeyMapError, hf_to_open_clip_state_dict
from mmkd.interop.preprocessing import _default_preprocess_cfg, preprocess_cfg_from_image_processor
from mmkd.interop.to_transformers import OPENCLIP_VOCAB_SIZE

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_MODEL_NAME",
    "WEIGHTS_NAME",
    "clip_model_to_open_clip",
    "export_open_clip",
    "preprocess_cfg_from_image_processor",
]

#: what open_clip's ``local-dir:`` / ``hf-hub:`` loaders read (``open_clip.constants.HF_CONFIG_NAME``).
CONFIG_NAME = "open_clip_config.json"
#: open_clip's preferred checkpoint name in a folder (``open_clip.constants.HF_SAFE_WEIGHTS_NAME``).
WEIGHTS_NAME = "open_clip_model.safetensors"
DEFAULT_MODEL_NAME = "mmkd-student"

#: open_clip's LayerNorm is ``nn.LayerNorm`` with its default eps; another eps goes into ``norm_kwargs``.
_OPEN_CLIP_LN_EPS = 1e-5
#: transformers' activations open_clip reproduces exactly: nn.GELU (with act_kwargs) or its QuickGELU.
_GELU_KWARGS = {"gelu": None, "gelu_pytorch_tanh": {"approximate": "tanh"}}
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _unsupported(feature: str) -> ValueError:
    return ValueError(f"cannot export this CLIPModel to open_clip: {feature} is not expressible by open_clip's CLIP")


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------


def _mlp_ratio(width: int, intermediate: int, tower: str) -> float:
    """A float ``r`` with ``int(width * r) == intermediate``, the way open_clip sizes its MLP."""
    ratio = intermediate / width
    for _ in range(4):  # float rounding can land just below the integer; step up one ulp at a time
        if int(width * ratio) == intermediate:
            return ratio
        ratio = math.nextafter(ratio, math.inf)
    raise _unsupported(f"a {tower} MLP width {intermediate} for hidden size {width} (int(width * mlp_ratio))")


def _tower_cfg(cfg: Any, tower: str) -> tuple[dict[str, Any], str]:
    """open_clip tower config (without the tower-specific keys) and the activation name of a HF sub-config."""
    width, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    if heads < 1 or width % heads:
        raise _unsupported(f"a {tower} hidden size {width} not divisible by its {heads} heads")
    act = cfg.hidden_act
    if not isinstance(act, str) or act not in (*_GELU_KWARGS, "quick_gelu"):
        raise _unsupported(
            f"{tower} hidden_act {act!r} (open_clip has nn.GELU -- 'gelu', 'gelu_pytorch_tanh' -- and 'quick_gelu')"
        )
    out: dict[str, Any] = {
        "layers": int(cfg.num_hidden_layers),
        "width": width,
        "mlp_ratio": _mlp_ratio(width, int(cfg.intermediate_size), tower),
    }
    eps = float(cfg.layer_norm_eps)
    if eps != _OPEN_CLIP_LN_EPS:
        out["norm_kwargs"] = {"eps": eps}
    if _GELU_KWARGS.get(act):
        out["act_kwargs"] = dict(_GELU_KWARGS[act])
    return out, act


def _open_clip_model_cfg(config: CLIPConfig) -> dict[str, Any]:
    """open_clip's model config for a ``CLIPConfig``; raises ``ValueError`` for what open_clip cannot express."""
    if not isinstance(config, CLIPConfig):
        raise TypeError(f"expected a transformers CLIPConfig, got {type(config).__name__}")
    vc, tc = config.vision_config, config.text_config
    vision, vision_act = _tower_cfg(vc, "vision")
    text, text_act = _tower_cfg(tc, "text")
    if (vision_act == "quick_gelu") != (text_act == "quick_gelu"):
        raise _unsupported(
            f"different activations in the vision ({vision_act!r}) and text ({text_act!r}) towers "
            "(open_clip's quick_gelu switch covers both)"
        )
    if int(vc.num_channels) != 3:
        raise _unsupported(f"{vc.num_channels} image channels (open_clip's ViT takes RGB)")
    image_size, patch_size = vc.image_size, vc.patch_size
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise _unsupported(f"a non-square image size {image_size!r} / patch size {patch_size!r}")
    vision.update(
        image_size=image_size,
        patch_size=patch_size,
        head_width=vision["width"] // int(vc.num_attention_heads),
    )

    vocab = int(tc.vocab_size)
    if vocab != OPENCLIP_VOCAB_SIZE:
        raise _unsupported(
            f"a text vocabulary of {vocab} tokens (open_clip's CLIP tokenizer has {OPENCLIP_VOCAB_SIZE})"
        )
    text.update(context_length=int(tc.max_position_embeddings), vocab_size=vocab, heads=int(tc.num_attention_heads))
    eos = tc.eos_token_id
    # transformers pools at argmax(input_ids) when eos_token_id == 2 (configs from before its PR #24773), otherwise
    # at the first eos_token_id. open_clip's 'argmax' pooling is the former, and also the latter when eos is the
    # largest id (CLIP's <|endoftext|> = 49407) and present -- open_clip's tokenizer always ends a text with it.
    if eos is None:
        raise _unsupported("a text config without eos_token_id (no pooling position)")
    if int(eos) not in (2, vocab - 1):
        text.update(pool_type="eos", eos_id=int(eos))
    # key order as in open_clip's own configs
    vision_cfg = {k: vision[k] for k in ("image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio")}
    vision_cfg.update({k: v for k, v in vision.items() if k not in vision_cfg})
    text_cfg = {k: text[k] for k in ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")}
    text_cfg.update({k: v for k, v in text.items() if k not in text_cfg})
    return {
        "embed_dim": int(config.projection_dim),
        "quick_gelu": vision_act == "quick_gelu",
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }


# ---------------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------------


def _open_clip_state_dict(model: CLIPModel, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    try:
        out = hf_to_open_clip_state_dict(sd, cfg["vision_cfg"]["layers"], cfg["text_cfg"]["layers"])
    except KeyMapError as exc:
        if exc.missing:
            raise _unsupported(f"a CLIPModel without {exc.missing[0]!r} (a modified architecture)") from None
        # e.g. a projection bias or an extra norm added to a CLIPModel subclass: open_clip's CLIP has no place for it
        unused = exc.unmapped
        shown = ", ".join(unused[:8]) + (f", ... ({len(unused)} in all)" if len(unused) > 8 else "")
        raise _unsupported(f"the parameter(s) {shown}") from None
    # safetensors wants contiguous, unshared tensors on the CPU
    return {k: t.to("cpu").contiguous().clone() for k, t in out.items()}


def clip_model_to_open_clip(model: CLIPModel) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(open_clip model config, open_clip state dict) for a transformers ``CLIPModel``, exactly.

    The config is open_clip's JSON format (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``), the state
    dict the one ``open_clip.CLIP(**config)`` loads with ``strict=True``: q/k/v projections fused into
    ``in_proj_weight`` / ``in_proj_bias`` (rows ``[q; k; v]``), the projections transposed (open_clip computes
    ``x @ proj``), tensors in the model's dtype on the CPU.

    Mapped beyond the defaults: a LayerNorm eps other than 1e-5 (``norm_kwargs``), ``gelu_pytorch_tanh``
    (``act_kwargs``), an ``eos_token_id`` other than 2 / the last id (``pool_type='eos'``). Raises ``ValueError``
    naming the feature for what open_clip's ``CLIP`` cannot express: activations other than gelu /
    gelu_pytorch_tanh / quick_gelu, quick_gelu in one tower only, a vocabulary other than CLIP's 49408 tokens
    (open_clip's tokenizer), non-RGB input, non-square images or patches, an MLP width ``int(width * ratio)``
    cannot give, and any parameter without an open_clip counterpart (a projection bias, an extra norm: the whole
    state dict must be used). Text attention is causal in both libraries (a stock ``CLIPModel`` has no other
    mode); dropout is an inference no-op and is not exported.
    """
    if not isinstance(model, CLIPModel):
        raise TypeError(f"expected a transformers CLIPModel, got {type(model).__name__}")
    cfg = _open_clip_model_cfg(model.config)
    return cfg, _open_clip_state_dict(model, cfg)


# ---------------------------------------------------------------------------------------------------------------
# checks and export
# ---------------------------------------------------------------------------------------------------------------


def _check_model_name(model_name: str) -> str:
    """A file stem open_clip can register, that is neither the hub config's name nor one of open_clip's own."""
    import open_clip

    if not isinstance(model_name, str) or not _MODEL_NAME_RE.fullmatch(model_name):
        raise ValueError(
            f"model name {model_name!r} must be a file stem of letters, digits, '.', '_' and '-' (open_clip "
            "registers <model_name>.json under its stem)"
        )
    if model_name.lower() == Path(CONFIG_NAME).stem:
        raise ValueError(f"model name {model_name!r} would overwrite {CONFIG_NAME}")
    builtin_dir = Path(open_clip.__file__).parent / "model_configs"
    if (builtin_dir / f"{model_name}.json").is_file():
        raise ValueError(
            f"model name {model_name!r} is one of open_clip's built-in architectures; registering the export "
            "under it would replace that architecture in the process that loads it: choose another name"
        )
    return model_name


def _check_student_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"model path {str(path)!r} is not a directory (expected a save_pretrained folder)")
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: not a transformers save_pretrained folder")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config} is not valid JSON: {exc}") from None
    if model_type != "clip":
        raise ValueError(f"{config} has model_type {model_type!r}, not 'clip' (a transformers CLIPModel)")


def _saved_image_processor(path: Path) -> Any | None:
    """The ``CLIPImageProcessor`` saved beside a model (``processor_config.json`` / ``preprocessor_config.json``)."""
    if not any((path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        return None
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor.from_pretrained(path)


def _verify(model: CLIPModel, cfg: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """Build open_clip's CLIP from the config, load the weights strictly and compare embeddings on one input.

    A self-check of the mapping (and of a model whose modules no longer match its config); raises
    ``RuntimeError`` rather than write a checkpoint that would load but compute something else.
    """
    import open_clip

    oc = open_clip.CLIP(**json.loads(json.dumps(cfg)))
    missing, unexpected = oc.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"open_clip's CLIP does not take the exported weights: missing {missing}, unexpected "
                           f"{unexpected}")
    if next(model.parameters()).dtype != torch.float32:
        logger.info("skipping the numerical export check for a %s model", next(model.parameters()).dtype)
        return
    oc.eval()
    size = cfg["vision_cfg"]["image_size"]
    ctx, vocab = cfg["text_cfg"]["context_length"], cfg["text_cfg"]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, size, size, generator=gen)
    n = min(ctx, 8)
    eos = model.config.text_config.eos_token_id
    eos = vocab - 1 if eos == 2 else int(eos)
    ids = torch.zeros(1, ctx, dtype=torch.long)
    ids[0, : n - 1] = torch.randint(0, min(vocab - 2, eos), (n - 1,), generator=gen)
    ids[0, n - 1] = eos
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hf_img = model.get_image_features(pixel_values=pixels.to(device)).pooler_output.cpu()
            hf_txt = model.get_text_features(input_ids=ids[:, :n].to(device)).pooler_output.cpu()
            oc_img, oc_txt = oc.encode_image(pixels), oc.encode_text(ids)
    finally:
        model.train(was_training)
    for what, a, b in (("image", hf_img, oc_img), ("text", hf_txt, oc_txt)):
        scale = max(1.0, float(a.abs().max()))
        diff = float((a - b).abs().max())
        if not diff <= 1e-4 * scale:
            raise RuntimeError(
                f"the exported open_clip model's {what} embedding differs from the CLIPModel's by {diff:.3g}: "
                "the model's modules do not match its config"
            )


def export_open_clip(
    model_or_dir: CLIPModel | str | Path,
    output_dir: str | Path,
    model_name: str | None = None,
    *,
    image_processor: Any | None = None,
    verify: bool = True,
) -> dict[str, Path]:
    """Write a ``CLIPModel`` as an open_clip checkpoint; returns ``{"config", "model_config", "weights"}`` paths.

    Args:
        model_or_dir: a live ``CLIPModel`` or a folder written by ``save_pretrained`` (an mmkd student).
        output_dir: where ``open_clip_config.json``, ``<model_name>.json`` and ``open_clip_model.safetensors``
            go (created if missing; those three files are overwritten). See the module docstring for loading.
        model_name: the stem of the bare model config, i.e. the name ``open_clip.add_model_config`` registers;
            default ``mmkd-student``. Refused: names of open_clip's built-in architectures, non-file-stem names.
        image_processor: the ``CLIPImageProcessor`` whose preprocessing to export; default: the one saved in
            ``model_or_dir``, else the preprocessing :mod:`mmkd.interop.to_transformers` recorded in the config, else open_clip's
            defaults (with a warning).
        verify: build open_clip's ``CLIP`` from the written config, load the weights strictly and compare the
            embeddings of one random image and text with the ``CLIPModel``'s before writing anything.

    Raises ``FileNotFoundError`` / ``ValueError`` for a missing or non-CLIP model folder, a bad name, and anything
    open_clip cannot express (see :func:`clip_model_to_open_clip`, :func:`preprocess_cfg_from_image_processor`),
    all before the weights are loaded when ``model_or_dir`` is a folder.
    """
    model_name = _check_model_name(model_name if model_name is not None else DEFAULT_MODEL_NAME)
    out_dir = Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output_dir {str(out_dir)!r} exists and is not a directory")

    if isinstance(model_or_dir, CLIPModel):
        model = model_or_dir
        cfg = _open_clip_model_cfg(model.config)
        image_size = cfg["vision_cfg"]["image_size"]
        if image_processor is not None:
            preprocess = preprocess_cfg_from_image_processor(image_processor, image_size)
        else:
            preprocess = _default_preprocess_cfg(model)
    elif isinstance(model_or_dir, (str, Path)):
        src = Path(model_or_dir)
        _check_student_dir(src)
        # every refusal (architecture, preprocessing) happens on the config before the weights are read
        cfg = _open_clip_model_cfg(CLIPConfig.from_pretrained(src))
        image_size = cfg["vision_cfg"]["image_size"]
        image_processor = image_processor if image_processor is not None else _saved_image_processor(src)
        preprocess = (
            preprocess_cfg_from_image_processor(image_processor, image_size) if image_processor is not None else None
        )
        model = CLIPModel.from_pretrained(src)
        if preprocess is None:
            preprocess = _default_preprocess_cfg(model)
    else:
        raise TypeError(f"model_or_dir must be a CLIPModel or a save_pretrained folder, got {type(model_or_dir)}")

    cfg, state_dict = clip_model_to_open_clip(model)
    if verify:
        _verify(model, cfg, state_dict)

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "config": out_dir / CONFIG_NAME,
        "model_config": out_dir / f"{model_name}.json",
        "weights": out_dir / WEIGHTS_NAME,
    }
    hub_preprocess = {k: preprocess[k] for k in ("mean", "std", "interpolation", "resize_mode")}
    paths["config"].write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": hub_preprocess}, indent=2) + "\n", encoding="utf-8"
    )
    paths["model_config"].write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    save_file(state_dict, str(paths["weights"]), metadata={"format": "pt", "exported_by": "mmkd.export"})
    return paths
