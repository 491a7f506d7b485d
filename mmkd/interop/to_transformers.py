"""Exact conversion of open_clip CLIP teachers to a stock ``transformers.CLIPModel`` + ``CLIPProcessor``.

mmkd's students are always plain ``transformers`` CLIP models, loadable without mmkd. A teacher trained with
`open_clip <https://github.com/mlfoundations/open_clip>`_ is converted here, weight for weight:

* :func:`open_clip_to_transformers` -- ``open_clip.CLIP`` (ViT image tower, standard text tower) to ``CLIPModel``.
  Anything open_clip can be configured to do that a stock ``CLIPModel`` cannot represent raises ``ValueError``
  naming the feature, so a conversion either is exact or does not happen.
* :func:`open_clip_tokenizer_to_transformers` -- the CLIP BPE tokenizer, built offline from the vocabulary file that
  ships inside the open_clip wheel.
* :func:`image_processor_from_open_clip` -- a ``CLIPImageProcessor`` with open_clip's resize/crop/normalisation.
* :func:`open_clip_processor` -- the two combined into a ``CLIPProcessor``.

Layout notes (open_clip 3.x): the residual blocks use ``nn.MultiheadAttention`` with a fused ``in_proj_weight``
(rows ``[q; k; v]``), ``mlp.c_fc`` / ``mlp.c_proj`` linears, and the transformers are batch-first
(``Transformer.batch_first=True``); the image projection ``visual.proj`` is a ``(width, embed_dim)`` parameter used
as ``x @ proj``, the text projection is either such a parameter or an ``nn.Linear``.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "OPENCLIP_BOS_TOKEN_ID",
    "OPENCLIP_EOS_TOKEN_ID",
    "OPENCLIP_VOCAB_SIZE",
    "image_processor_from_open_clip",
    "open_clip_processor",
    "open_clip_to_transformers",
    "open_clip_tokenizer_to_transformers",
]

#: ids of open_clip's ``<start_of_text>`` / ``<end_of_text>`` (transformers: ``<|startoftext|>`` / ``<|endoftext|>``).
OPENCLIP_BOS_TOKEN_ID = 49406
OPENCLIP_EOS_TOKEN_ID = 49407
#: 256 byte tokens + 256 end-of-word byte tokens + 48894 merges + 2 special tokens.
OPENCLIP_VOCAB_SIZE = 49408
_NUM_MERGES = OPENCLIP_VOCAB_SIZE - 256 * 2 - 2  # open_clip reads merges[1 : 49152 - 256 - 2 + 1]

#: key under which the converted model's config records the teacher's image preprocessing (plain JSON data,
#: ignored by ``CLIPModel`` itself; read back by :func:`image_processor_from_open_clip`).
PREPROCESS_CONFIG_KEY = "open_clip_preprocess_cfg"


# ---------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------


def _unsupported(feature: str, model: nn.Module) -> ValueError:
    return ValueError(
        f"cannot convert {type(model).__module__}.{type(model).__name__} to a stock transformers CLIPModel: "
        f"{feature} is not representable by transformers' CLIP"
    )


def _uniform(values: Iterable[Any], what: str, model: nn.Module) -> Any:
    values = list(values)
    if any(v != values[0] for v in values[1:]):
        raise _unsupported(f"non-uniform {what} across layers ({sorted(set(values))})", model)
    return values[0]


def _layer_norm_params(ln: nn.Module, where: str, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(weight, bias, eps) of an open_clip LayerNorm; a missing affine weight/bias is an exact ones/zeros."""
    if not isinstance(ln, nn.LayerNorm):
        raise _unsupported(f"{where} is a {type(ln).__name__}, not a LayerNorm", model)
    if len(ln.normalized_shape) != 1:
        raise _unsupported(f"{where} normalises over {tuple(ln.normalized_shape)} (not the last dim only)", model)
    (dim,) = ln.normalized_shape
    ref = next((p for p in (ln.weight, ln.bias) if p is not None), None)
    kw = {"dtype": ref.dtype if ref is not None else torch.float32}
    weight = ln.weight if ln.weight is not None else torch.ones(dim, **kw)
    bias = ln.bias if ln.bias is not None else torch.zeros(dim, **kw)
    return weight, bias, float(ln.eps)


def _activation_name(act: nn.Module, where: str, model: nn.Module) -> str:
    from open_clip.transformer import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]
    raise _unsupported(f"{where} activation {type(act).__name__}", model)


def _convert_transformer(
    transformer: nn.Module, prefix: str, sd: dict[str, torch.Tensor], ln_eps: list[float], tower: str, model: nn.Module
) -> dict[str, Any]:
    """Copy open_clip ``Transformer.resblocks`` into ``{prefix}.layers.{i}``; returns the tower's config values."""
    from open_clip.transformer import ResidualAttentionBlock

    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or len(blocks) == 0:
        raise _unsupported(f"{tower} transformer without resblocks ({type(transformer).__name__})", model)
    heads, acts, inter, dropouts = [], [], [], []
    for i, blk in enumerate(blocks):
        where = f"{tower} resblocks[{i}]"
        if type(blk) is not ResidualAttentionBlock:
            # CustomResidualAttentionBlock: qk_norm / scaled_cosine_attn / scale_heads / scale_attn(_inner) / scale_fc
            raise _unsupported(
                f"custom attention block {type(blk).__name__} in {where} "
                "(qk_norm / scaled_cosine_attn / scale_heads / scale_attn / scale_attn_inner / scale_fc / block_type)",
                model,
            )
        if hasattr(blk, "ln_1_kv"):
            raise _unsupported(f"cross-attention in {where}", model)
        for name in ("ls_1", "ls_2"):
            if not isinstance(getattr(blk, name), nn.Identity):
                raise _unsupported(f"LayerScale (ls_init_value) in {where}", model)
        attn = blk.attn
        if not isinstance(attn, nn.MultiheadAttention):
            raise _unsupported(f"{where} attention {type(attn).__name__}", model)
        if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
            raise _unsupported(f"separate q/k/v input dims (kdim/vdim) in {where}", model)
        if attn.bias_k is not None or attn.bias_v is not None:
            raise _unsupported(f"attention add_bias_kv in {where}", model)
        if attn.add_zero_attn:
            raise _unsupported(f"attention add_zero_attn in {where}", model)
        mlp_keys = list(blk.mlp._modules) if isinstance(blk.mlp, nn.Sequential) else None
        if mlp_keys != ["c_fc", "gelu", "c_proj"]:
            raise _unsupported(f"non-standard MLP {mlp_keys or type(blk.mlp).__name__} in {where}", model)

        d = attn.embed_dim
        w = attn.in_proj_weight
        b = attn.in_proj_bias if attn.in_proj_bias is not None else torch.zeros(3 * d, dtype=w.dtype)
        p = f"{prefix}.layers.{i}"
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[f"{p}.self_attn.{name}.weight"] = w[j * d : (j + 1) * d]
            sd[f"{p}.self_attn.{name}.bias"] = b[j * d : (j + 1) * d]
        out = attn.out_proj
        sd[f"{p}.self_attn.out_proj.weight"] = out.weight
        sd[f"{p}.self_attn.out_proj.bias"] = out.bias if out.bias is not None else torch.zeros(d, dtype=out.weight.dtype)
        for ln_name, hf_name in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2")):
            weight, bias, eps = _layer_norm_params(getattr(blk, ln_name), f"{where}.{ln_name}", model)
            sd[f"{p}.{hf_name}.weight"], sd[f"{p}.{hf_name}.bias"] = weight, bias
            ln_eps.append(eps)
        for oc_name, hf_name in (("c_fc", "fc1"), ("c_proj", "fc2")):
            lin = blk.mlp._modules[oc_name]
            if not isinstance(lin, nn.Linear):
                raise _unsupported(f"{where}.mlp.{oc_name} is a {type(lin).__name__}", model)
            sd[f"{p}.mlp.{hf_name}.weight"] = lin.weight
            sd[f"{p}.mlp.{hf_name}.bias"] = (
                lin.bias if lin.bias is not None else torch.zeros(lin.out_features, dtype=lin.weight.dtype)
            )
        heads.append(attn.num_heads)
        acts.append(_activation_name(blk.mlp._modules["gelu"], where, model))
        inter.append(blk.mlp._modules["c_fc"].out_features)
        dropouts.append(float(attn.dropout))
    return {
        "hidden_size": blocks[0].attn.embed_dim,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": _uniform(heads, f"{tower} head count", model),
        "intermediate_size": _uniform(inter, f"{tower} MLP width", model),
        "hidden_act": _uniform(acts, f"{tower} activation", model),
        "attention_dropout": _uniform(dropouts, f"{tower} attention dropout", model),
    }


def _check_model_class(model: nn.Module) -> None:
    import open_clip
    from open_clip.hf_model import HFTextEncoder

    if isinstance(model, open_clip.CLIP):
        return
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an open_clip.CLIP model, got {type(model).__name__}")
    if isinstance(model, open_clip.CoCa):
        raise _unsupported("the CoCa multimodal text decoder / attentional pooling", model)
    if isinstance(getattr(model, "text", None), HFTextEncoder):
        raise _unsupported("a Hugging Face text tower (HFTextEncoder, text_cfg.hf_model_name)", model)
    if isinstance(model, open_clip.CustomTextCLIP):
        raise _unsupported("a CustomTextCLIP text tower (custom_text)", model)
    raise _unsupported("a model class other than open_clip.CLIP", model)


def _convert_vision(model: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[dict[str, Any], int]:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import PatchDropout, VisionTransformer

    visual = model.visual
    if isinstance(visual, ModifiedResNet):
        raise _unsupported("a ModifiedResNet vision tower", model)
    if isinstance(visual, TimmModel):
        raise _unsupported("a timm vision tower (vision_cfg.timm_model_name)", model)
    if not isinstance(visual, VisionTransformer):
        raise _unsupported(f"a {type(visual).__name__} vision tower", model)
    if getattr(visual, "attn_pool", None) is not None:
        raise _unsupported("attentional pooling in the vision tower (attentional_pool)", model)
    if visual.pool_type != "tok":
        raise _unsupported(f"vision pool_type {visual.pool_type!r} (only class-token pooling 'tok')", model)
    # final_ln_after_pool with class-token pooling is exact: LayerNorm acts per token, so ln_post(x)[:, 0] equals
    # ln_post(x[:, 0]); it only changes the returned patch tokens, which CLIP embeddings do not use.
    if isinstance(visual.ln_pre, nn.Identity):
        raise _unsupported("a vision tower without ln_pre (no_ln_pre)", model)
    if visual.conv1.bias is not None:
        raise _unsupported("a bias in the patch embedding (conv1)", model)
    if visual.proj is None:
        raise _unsupported("a vision tower without output projection (visual.proj is None)", model)
    if isinstance(visual.patch_dropout, PatchDropout):
        logger.info("ignoring patch dropout (p=%s): it is a no-op at inference", visual.patch_dropout.prob)
    image_h, image_w = visual.image_size
    patch_h, patch_w = visual.patch_size
    if image_h != image_w or patch_h != patch_w:
        raise _unsupported(f"a non-square image size {visual.image_size} / patch size {visual.patch_size}", model)
    grid = image_h // patch_h
    if tuple(visual.positional_embedding.shape) != (grid * grid + 1, visual.conv1.out_channels):
        raise _unsupported(
            f"a vision positional embedding of shape {tuple(visual.positional_embedding.shape)} for a "
            f"{grid}x{grid} grid",
            model,
        )

    sd["vision_model.embeddings.patch_embedding.weight"] = visual.conv1.weight
    sd["vision_model.embeddings.class_embedding"] = visual.class_embedding
    sd["vision_model.embeddings.position_embedding.weight"] = visual.positional_embedding
    ln_eps: list[float] = []
    for oc_ln, hf_ln in ((visual.ln_pre, "pre_layrnorm"), (visual.ln_post, "post_layernorm")):
        weight, bias, eps = _layer_norm_params(oc_ln, f"visual.{hf_ln}", model)
        sd[f"vision_model.{hf_ln}.weight"], sd[f"vision_model.{hf_ln}.bias"] = weight, bias
        ln_eps.append(eps)
    cfg = _convert_transformer(visual.transformer, "vision_model.encoder", sd, ln_eps, "vision", model)
    if cfg["hidden_size"] != visual.conv1.out_channels or visual.proj.shape[0] != cfg["hidden_size"]:
        raise _unsupported("a vision tower whose width changes between embedding, blocks and projection", model)
    sd["visual_projection.weight"] = visual.proj.t()
    cfg.update(
        image_size=int(image_h),
        patch_size=int(patch_h),
        num_channels=visual.conv1.in_channels,
        layer_norm_eps=_uniform(ln_eps, "vision LayerNorm eps", model),
    )
    return cfg, int(visual.proj.shape[1])


def _convert_text(model: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[dict[str, Any], int]:
    ctx = int(model.context_length)
    pos = model.positional_embedding
    if pos.shape[0] != ctx:
        raise _unsupported(
            f"a text positional embedding with {pos.shape[0]} rows for context length {ctx} (embed_cls / "
            "non-standard context length)",
            model,
        )
    mask = getattr(model, "attn_mask", None)
    if mask is None:
        raise _unsupported("a non-causal text mask (no_causal_mask)", model)
    causal = torch.full((ctx, ctx), float("-inf")).triu_(1)
    if tuple(mask.shape) != (ctx, ctx) or not torch.equal(mask.detach().float().cpu(), causal):
        raise _unsupported(f"a non-causal / non-standard text attention mask of shape {tuple(mask.shape)}", model)
    pool = model.text_pool_type
    eos_id = getattr(model, "text_eos_id", None)
    if not (pool == "argmax" or (pool == "eos" and eos_id == OPENCLIP_EOS_TOKEN_ID)):
        raise _unsupported(
            f"text pool_type {pool!r} (eos_id={eos_id}); only argmax / end-of-text pooling is supported", model
        )
    if model.vocab_size != OPENCLIP_VOCAB_SIZE or model.token_embedding.num_embeddings != OPENCLIP_VOCAB_SIZE:
        # With the CLIP BPE vocabulary the end-of-text token is the largest id, so open_clip's argmax pooling equals
        # transformers' "first eos_token_id" pooling; with another vocabulary that no longer holds.
        raise _unsupported(
            f"a text vocabulary of {model.vocab_size} tokens (argmax/eot pooling needs the {OPENCLIP_VOCAB_SIZE}-token "
            "CLIP BPE vocabulary)",
            model,
        )
    proj = model.text_projection
    if proj is None:
        raise _unsupported("a text tower without output projection (proj_type='none')", model)
    if isinstance(proj, nn.Linear):
        if proj.bias is not None:
            raise _unsupported("a bias in the text projection (proj_bias)", model)
        proj_weight = proj.weight  # (embed, width), already the HF layout
    elif isinstance(proj, torch.Tensor) and proj.ndim == 2:
        proj_weight = proj.t()  # (width, embed) used as x @ proj
    else:
        raise _unsupported(f"a text projection of type {type(proj).__name__}", model)

    sd["text_model.embeddings.token_embedding.weight"] = model.token_embedding.weight
    sd["text_model.embeddings.position_embedding.weight"] = pos
    weight, bias, eps = _layer_norm_params(model.ln_final, "ln_final", model)
    sd["text_model.final_layer_norm.weight"], sd["text_model.final_layer_norm.bias"] = weight, bias
    ln_eps = [eps]
    cfg = _convert_transformer(model.transformer, "text_model.encoder", sd, ln_eps, "text", model)
    if cfg["hidden_size"] != pos.shape[1] or proj_weight.shape[1] != cfg["hidden_size"]:
        raise _unsupported("a text tower whose width changes between embedding, blocks and projection", model)
    sd["text_projection.weight"] = proj_weight
    cfg.update(
        vocab_size=OPENCLIP_VOCAB_SIZE,
        max_position_embeddings=ctx,
        layer_norm_eps=_uniform(ln_eps, "text LayerNorm eps", model),
        bos_token_id=OPENCLIP_BOS_TOKEN_ID,
        eos_token_id=OPENCLIP_EOS_TOKEN_ID,
        pad_token_id=OPENCLIP_EOS_TOKEN_ID,
    )
    return cfg, int(proj_weight.shape[0])


def _mean_std(values: Any, name: str) -> list[float]:
    if isinstance(values, (int, float)):
        values = (values,) * 3
    values = [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (RGB), got {values}")
    return values


def _openclip_preprocess_cfg(model: nn.Module) -> dict[str, Any]:
    """open_clip's inference preprocessing for ``model`` as plain JSON data, with open_clip's defaults filled in."""
    import open_clip

    raw = dict(open_clip.get_model_preprocess_cfg(model) or {})
    size = raw.get("size", getattr(model.visual, "image_size", 224))
    return {
        "size": list(size) if isinstance(size, (tuple, list)) else [int(size), int(size)],
        "mean": _mean_std(raw.get("mean") or open_clip.OPENAI_DATASET_MEAN, "mean"),
        "std": _mean_std(raw.get("std") or open_clip.OPENAI_DATASET_STD, "std"),
        "interpolation": raw.get("interpolation") or "bicubic",
        "resize_mode": raw.get("resize_mode") or "shortest",
    }


def open_clip_to_transformers(
    model: nn.Module,
    *,
    image_mean: Iterable[float] | None = None,
    image_std: Iterable[float] | None = None,
) -> CLIPModel:
    """Convert an ``open_clip.CLIP`` (ViT image tower, standard text tower) to an equivalent ``CLIPModel``.

    Every weight is copied (checked by a strict ``load_state_dict``); ``encode_image`` / ``encode_text`` of the
    teacher equal ``get_image_features`` / ``get_text_features`` of the result up to float rounding. The result has
    the dtype of the teacher's patch embedding (a mixed-precision open_clip model -- ``precision='fp16'`` keeps
    LayerNorms and embeddings in fp32 -- becomes uniformly low-precision), is in eval mode and has
    ``config.architectures == ["CLIPModel"]`` so that ``pipeline("zero-shot-image-classification", model=dir)``
    works after ``save_pretrained``.

    ``image_mean`` / ``image_std`` override the normalisation open_clip recorded on the model (its
    ``visual.preprocess_cfg``; OpenAI's mean/std if none): the teacher's image preprocessing is stored as plain
    data in ``config.open_clip_preprocess_cfg`` (ignored by ``CLIPModel``), where
    :func:`image_processor_from_open_clip` finds it when given the converted model.

    Raises ``ValueError`` naming the feature for anything a stock ``CLIPModel`` cannot represent: ModifiedResNet /
    timm image towers, HF / custom text towers (CustomTextCLIP, CoCa), attentional pooling, LayerScale
    (``ls_init_value``), custom attention blocks (qk-norm, scaled-cosine attention, head scaling, extra norms), vision
    pooling other than the class token, text pooling other than argmax / end-of-text, ``no_ln_pre``, a non-causal text
    mask, a context length that differs from the text positional embedding, biases in the patch embedding or the
    projections, ``logit_bias`` (SigLIP), non-square images or patches, a non-CLIP vocabulary, and non-uniform
    activations / LayerNorm eps / MLP widths across a tower. Things that are exact anyway are accepted: missing
    biases or LayerNorm affines (become zeros / ones), ``final_ln_after_pool`` with class-token pooling, patch
    dropout (inference no-op), ``pos_embed_type='sin_cos_2d'`` (a fixed table, copied as is).
    """
    _check_model_class(model)
    if getattr(model, "logit_bias", None) is not None:
        raise _unsupported("a logit_bias (SigLIP-style sigmoid loss, init_logit_bias)", model)
    if model.logit_scale.numel() != 1:
        raise _unsupported(f"a logit_scale of shape {tuple(model.logit_scale.shape)}", model)

    sd: dict[str, torch.Tensor] = {}
    vision_cfg, vision_proj_dim = _convert_vision(model, sd)
    text_cfg, text_proj_dim = _convert_text(model, sd)
    if vision_proj_dim != text_proj_dim:
        raise _unsupported(f"different image ({vision_proj_dim}) and text ({text_proj_dim}) embedding dims", model)
    logit_scale = model.logit_scale.detach().reshape(())
    sd["logit_scale"] = logit_scale

    preprocess = _openclip_preprocess_cfg(model)
    if image_mean is not None:
        preprocess["mean"] = _mean_std(image_mean, "image_mean")
    if image_std is not None:
        preprocess["std"] = _mean_std(image_std, "image_std")

    config = CLIPConfig(
        text_config={**text_cfg, "projection_dim": text_proj_dim},
        vision_config={**vision_cfg, "projection_dim": vision_proj_dim},
        projection_dim=vision_proj_dim,
        logit_scale_init_value=float(logit_scale),
    )
    config.architectures = ["CLIPModel"]
    setattr(config, PREPROCESS_CONFIG_KEY, preprocess)

    dtype = model.visual.conv1.weight.dtype
    hf_model = CLIPModel(config)
    with torch.no_grad():  # strict: every CLIPModel weight comes from the teacher; copy_ casts dtype / device
        hf_model.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=True)
    hf_model.to(device=model.visual.conv1.weight.device, dtype=dtype)
    hf_model.eval()
    return hf_model


# ---------------------------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------------------------


def _openclip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """open_clip's ``SimpleTokenizer`` vocabulary and merges, in transformers' CLIP naming of the special tokens."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    # line 0 is the "#version: 0.2" header; open_clip keeps the next 48894 merges
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise RuntimeError(f"unexpected BPE merges file {default_bpe()}")
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # open_clip: <start_of_text>, <end_of_text>; same ids
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != OPENCLIP_VOCAB_SIZE or vocab["<|endoftext|>"] != OPENCLIP_EOS_TOKEN_ID:
        raise RuntimeError("the open_clip BPE vocabulary does not have the expected size / special token ids")
    return vocab, merges


def open_clip_tokenizer_to_transformers(context_length: int = 77) -> CLIPTokenizer:
    """A fast (``tokenizers``-backed) ``CLIPTokenizer`` equal to open_clip's default ``SimpleTokenizer``.

    Built offline from ``bpe_simple_vocab_16e6.txt.gz`` in the open_clip wheel (vocab: 256 byte tokens, the same with
    ``</w>``, the 48894 merges, then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407). bos is
    ``<|startoftext|>``; eos, pad and unk are ``<|endoftext|>``; ``model_max_length = context_length``.

    ``tok(texts, padding="max_length", truncation=True)`` (max_length defaults to ``context_length``) gives the ids of
    ``open_clip.tokenize(texts, context_length)`` at every position up to and including the end-of-text token,
    also for over-long texts: transformers truncates the content to ``context_length - 2`` tokens and then adds
    bos/eos, open_clip truncates ``[sot] + content + [eot]`` to ``context_length`` and overwrites the last id with
    eot -- the same ids. Only the padding differs: open_clip pads with 0, transformers with the pad id 49407. That
    does not change the text embedding: the text tower is causal, so positions up to the end-of-text token never
    attend to the padding, and the embedding is read at the first end-of-text token.

    Known differences, outside ordinary text: open_clip cleans text with ``ftfy.fix_text`` (mojibake repair, curly
    quotes to straight ones, ...) and a double ``html.unescape`` (``&amp;`` to ``&``) before tokenising; transformers'
    CLIP tokenizer only applies NFC, whitespace collapsing and lower-casing. Normalise such text before calling the
    tokenizer if it matters. Without ``truncation=True`` transformers does not truncate at all.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (bos + eos), got {context_length}")
    vocab, merges = _openclip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=context_length,
    )


# ---------------------------------------------------------------------------------------------------------------
# image processor / processor
# ---------------------------------------------------------------------------------------------------------------


def _preprocess_cfg_of(obj: Any) -> dict[str, Any]:
    if isinstance(obj, CLIPModel):
        cfg = getattr(obj.config, PREPROCESS_CONFIG_KEY, None)
        if cfg is None:
            size = obj.config.vision_config.image_size
            cfg = {"size": [size, size]}
        return dict(cfg)
    if isinstance(obj, nn.Module):
        _check_model_class(obj)
        return _openclip_preprocess_cfg(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "__dataclass_fields__"):  # open_clip.transform.PreprocessCfg
        from dataclasses import asdict

        return asdict(obj)
    raise TypeError(f"expected an open_clip model, a converted CLIPModel or a preprocess cfg, got {type(obj).__name__}")


def image_processor_from_open_clip(model_or_preprocess_cfg: Any) -> CLIPImageProcessor:
    """A ``CLIPImageProcessor`` reproducing open_clip's inference transform.

    Accepts an open_clip model (its ``visual.preprocess_cfg`` via ``open_clip.get_model_preprocess_cfg``), an
    open_clip ``PreprocessCfg`` or dict, or a model converted by :func:`open_clip_to_transformers`. Missing values
    default as in open_clip (OpenAI mean/std, bicubic, shortest-edge resize).

    The result resizes the shortest edge to the image size (bicubic unless the cfg says bilinear), centre-crops to
    the image size, rescales by 1/255, normalises with open_clip's mean/std and converts to RGB (``resize_mode``
    'squash' becomes a plain resize to a square; 'longest' has no equivalent and raises ``ValueError``).

    It is the class ``AutoImageProcessor`` resolves for "clip" in transformers v5: ``CLIPImageProcessor``, the
    torchvision backend (the PIL one is ``CLIPImageProcessorPil``). It resizes the uint8 tensor with torch's
    antialiased bicubic where open_clip resizes the PIL image with PIL's bicubic: the results agree except for
    occasional one-level uint8 rounding differences, i.e. at most ``1 / (255 * std)`` (~0.015) after normalisation.
    One systematic difference remains, shared by every transformers CLIP processor: the centre-crop offset is
    ``int((h - crop) / 2)`` in transformers and ``round((h - crop) / 2)`` (half to even) in torchvision, so when the
    resized edge exceeds the crop by 3 (mod 4) pixels the transformers crop sits one pixel further left / up.
    (RGB conversion happens before resizing here and after it in open_clip; identical for RGB inputs.)
    """
    from transformers.image_utils import PILImageResampling

    cfg = _preprocess_cfg_of(model_or_preprocess_cfg)
    size = cfg.get("size", 224)
    height, width = (size, size) if isinstance(size, (int, float)) else tuple(size)
    if height != width:
        raise ValueError(f"non-square image size {size} is not supported by CLIPModel / CLIPImageProcessor")
    size = int(height)
    interpolation = cfg.get("interpolation") or "bicubic"
    resample = {
        "bicubic": PILImageResampling.BICUBIC,
        "random": PILImageResampling.BICUBIC,  # open_clip uses bicubic at inference for 'random'
        "bilinear": PILImageResampling.BILINEAR,
    }.get(interpolation)
    if resample is None:
        raise ValueError(f"unsupported open_clip interpolation {interpolation!r}")
    resize_mode = cfg.get("resize_mode") or "shortest"
    if resize_mode == "shortest":
        resize_kwargs: dict[str, Any] = {"size": {"shortest_edge": size}, "do_center_crop": True}
    elif resize_mode == "squash":
        resize_kwargs = {"size": {"height": size, "width": size}, "do_center_crop": False}
    else:  # 'longest': resize the longest edge then pad -- no CLIPImageProcessor equivalent
        raise ValueError(f"open_clip resize_mode {resize_mode!r} is not supported by CLIPImageProcessor")
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return CLIPImageProcessor(
        do_resize=True,
        resample=resample,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=_mean_std(cfg.get("mean") or OPENAI_DATASET_MEAN, "mean"),
        image_std=_mean_std(cfg.get("std") or OPENAI_DATASET_STD, "std"),
        do_convert_rgb=True,
        **resize_kwargs,
    )


def open_clip_processor(model: nn.Module) -> CLIPProcessor:
    """``CLIPProcessor`` for an open_clip model (or a model converted from one): tokenizer + image processor.

    The tokenizer's ``model_max_length`` is the model's context length.
    """
    if isinstance(model, CLIPModel):
        context_length = model.config.text_config.max_position_embeddings
    else:
        _check_model_class(model)
        context_length = int(model.context_length)
    return CLIPProcessor(
        image_processor=image_processor_from_open_clip(model),
        tokenizer=open_clip_tokenizer_to_transformers(context_length),
    )

