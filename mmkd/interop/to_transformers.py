"""Exact conversion of open_clip CLIP teachers to a stock ``transformers.CLIPModel`` + ``CLIPProcessor``.

mmkd's students are plain ``transformers`` CLIP models, loadable without mmkd; an open_clip teacher is
converted here weight for weight:

* :func:`open_clip_to_transformers` -- ``open_clip.CLIP`` (ViT image tower, standard text tower) to
  ``CLIPModel``. The modules are walked first and anything a stock ``CLIPModel`` cannot represent raises
  ``ValueError`` naming the feature, so a conversion is exact or does not happen; the tensors then go through
  the one key table of :mod:`mmkd.interop.keymap` (shared with the inverse, :mod:`mmkd.interop.to_open_clip`).
* :func:`open_clip_tokenizer_to_transformers` -- the CLIP BPE tokenizer, built offline from the vocabulary file
  that ships inside the open_clip wheel.
* :func:`open_clip_processor` -- that tokenizer plus :func:`image_processor_from_open_clip`
  (:mod:`mmkd.interop.preprocessing`) as a ``CLIPProcessor``.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

from mmkd.interop.keymap import key_table, open_clip_to_hf_state_dict
from mmkd.interop.preprocessing import (
    PREPROCESS_CONFIG_KEY,
    _openclip_preprocess_cfg,
    _rgb,
    image_processor_from_open_clip,
)

logger = logging.getLogger(__name__)

__all__ = [
    "OPENCLIP_BOS_TOKEN_ID",
    "OPENCLIP_EOS_TOKEN_ID",
    "OPENCLIP_VOCAB_SIZE",
    "PREPROCESS_CONFIG_KEY",
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


def _layer_norm_eps(ln: nn.Module, where: str, model: nn.Module) -> float:
    """eps of an open_clip LayerNorm over the last dim (a missing affine is filled in by :func:`_absent`)."""
    if not isinstance(ln, nn.LayerNorm):
        raise _unsupported(f"{where} is a {type(ln).__name__}, not a LayerNorm", model)
    if len(ln.normalized_shape) != 1:
        raise _unsupported(f"{where} normalises over {tuple(ln.normalized_shape)} (not the last dim only)", model)
    return float(ln.eps)


def _activation_name(act: nn.Module, where: str, model: nn.Module) -> str:
    from open_clip.transformer import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[act.approximate]
    raise _unsupported(f"{where} activation {type(act).__name__}", model)


def _check_transformer(
    transformer: nn.Module, ln_eps: list[float], tower: str, model: nn.Module
) -> dict[str, Any]:
    """Check open_clip ``Transformer.resblocks`` are stock CLIP blocks; returns the tower's config values."""
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
        for ln_name in ("ln_1", "ln_2"):
            ln_eps.append(_layer_norm_eps(getattr(blk, ln_name), f"{where}.{ln_name}", model))
        for oc_name in ("c_fc", "c_proj"):
            lin = blk.mlp._modules[oc_name]
            if not isinstance(lin, nn.Linear):
                raise _unsupported(f"{where}.mlp.{oc_name} is a {type(lin).__name__}", model)
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


def _check_vision(model: nn.Module) -> tuple[dict[str, Any], int]:
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

    ln_eps = [_layer_norm_eps(ln, f"visual.{name}", model) for name, ln in (("ln_pre", visual.ln_pre),
                                                                            ("ln_post", visual.ln_post))]
    cfg = _check_transformer(visual.transformer, ln_eps, "vision", model)
    if cfg["hidden_size"] != visual.conv1.out_channels or visual.proj.shape[0] != cfg["hidden_size"]:
        raise _unsupported("a vision tower whose width changes between embedding, blocks and projection", model)
    cfg.update(
        image_size=int(image_h),
        patch_size=int(patch_h),
        num_channels=visual.conv1.in_channels,
        layer_norm_eps=_uniform(ln_eps, "vision LayerNorm eps", model),
    )
    return cfg, int(visual.proj.shape[1])


def _check_text(model: nn.Module) -> tuple[dict[str, Any], int]:
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

    ln_eps = [_layer_norm_eps(model.ln_final, "ln_final", model)]
    cfg = _check_transformer(model.transformer, ln_eps, "text", model)
    if cfg["hidden_size"] != pos.shape[1] or proj_weight.shape[1] != cfg["hidden_size"]:
        raise _unsupported("a text tower whose width changes between embedding, blocks and projection", model)
    cfg.update(
        vocab_size=OPENCLIP_VOCAB_SIZE,
        max_position_embeddings=ctx,
        layer_norm_eps=_uniform(ln_eps, "text LayerNorm eps", model),
        bos_token_id=OPENCLIP_BOS_TOKEN_ID,
        eos_token_id=OPENCLIP_EOS_TOKEN_ID,
        pad_token_id=OPENCLIP_EOS_TOKEN_ID,
    )
    return cfg, int(proj_weight.shape[0])


def _absent(module: nn.Module, name: str) -> torch.Tensor:
    """The exact value of a tensor open_clip leaves out: LayerNorm affine (ones / zeros), a bias (zeros)."""
    if isinstance(module, nn.LayerNorm):
        ref = module.weight if module.weight is not None else module.bias
        fill = torch.ones if name == "weight" else torch.zeros
        return fill(module.normalized_shape, dtype=ref.dtype if ref is not None else torch.float32)
    if name.endswith("bias"):  # nn.Linear .bias, nn.MultiheadAttention .in_proj_bias
        weight = getattr(module, name[: -len("bias")] + "weight")
        return torch.zeros(weight.shape[0], dtype=weight.dtype)
    raise RuntimeError(f"{type(module).__name__}.{name} is None")  # the checks above refuse such models


def _open_clip_tensors(model: nn.Module, n_vision_layers: int, n_text_layers: int) -> dict[str, torch.Tensor]:
    """The open_clip tensors the key table names, read off the modules (:func:`_absent` fills the gaps)."""
    out: dict[str, torch.Tensor] = {}
    for entry in key_table(n_vision_layers, n_text_layers):
        path, _, name = entry.open_clip.rpartition(".")
        module = model.get_submodule(path)
        value = getattr(module, name)
        if isinstance(value, nn.Linear):  # text_projection as a bias-free nn.Linear: weight (embed, width)
            value = value.weight.t()  # open_clip's parameter layout, (width, embed) used as x @ proj
        out[entry.open_clip] = value if value is not None else _absent(module, name)
    return out


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

    vision_cfg, vision_proj_dim = _check_vision(model)
    text_cfg, text_proj_dim = _check_text(model)
    if vision_proj_dim != text_proj_dim:
        raise _unsupported(f"different image ({vision_proj_dim}) and text ({text_proj_dim}) embedding dims", model)
    layers = (vision_cfg["num_hidden_layers"], text_cfg["num_hidden_layers"])
    sd = open_clip_to_hf_state_dict(_open_clip_tensors(model, *layers), *layers)
    logit_scale = model.logit_scale.detach().reshape(())

    preprocess = _openclip_preprocess_cfg(model)
    if image_mean is not None:
        preprocess["mean"] = _rgb(image_mean, "image_mean")
    if image_std is not None:
        preprocess["std"] = _rgb(image_std, "image_std")

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
# processor
# ---------------------------------------------------------------------------------------------------------------


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

