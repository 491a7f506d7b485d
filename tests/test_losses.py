"""Golden-value and behavioural tests for mmkd.losses (single process, CPU, float64 where exact)."""

from __future__ import annotations

import math

import pytest
import torch

from mmkd.losses import CombinedLoss, LossInputs, total_loss
from mmkd.losses.clip import (
    AffinityDistillationLoss,
    CLIPContrastiveLoss,
    EmbeddingDistillationLoss,
    TripletLoss,
    affinity_distillation_loss,
    clip_contrastive_loss,
    cosine_distance,
    embedding_mse,
    mine_negatives,
    triplet_loss,
)

DT = torch.float64


def batch(si, st, ti=None, tt=None, logit_scale=None) -> LossInputs:
    """The loss modules' input: student (and teacher) embeddings of one batch."""
    return LossInputs(student_image=si, student_text=st, teacher_image=ti, teacher_text=tt, logit_scale=logit_scale)


def t(rows: list[list[float]], grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=DT, requires_grad=grad)


def assert_scalar(actual: torch.Tensor, expected: float, tol: float = 1e-9) -> None:
    assert actual.dim() == 0
    assert abs(actual.item() - expected) < tol, (actual.item(), expected)


def cyclic_candidates() -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors e_i and candidates c_j = cyclic shifts of (4, 2, 1) (all norm sqrt(21)).

    cos(e_i, c_j) = c_j[i] / sqrt(21), i.e. sqrt(21) * S = [[4, 1, 2],
                                                            [2, 4, 1],
                                                            [1, 2, 4]].
    The diagonal (each anchor's own positive) is the largest entry of every row, so mining must skip
    it; among j != i the hardest negatives are [2, 0, 1] (value 2) and the easy ones [1, 2, 0] (value 1).
    """
    anchor = t([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    cand = t([[4, 1, 2], [2, 4, 1], [1, 2, 4]]).T.contiguous()  # row j = column j above
    return anchor, cand


# ------------------------------------------------------------------------------------------------
# triplet
# ------------------------------------------------------------------------------------------------


def test_triplet_orthogonal_golden() -> None:
    # anchors e1, e2; positives e2, e1 -> cos(a_i, p_i) = 0. The only other candidate is the other
    # positive, parallel to the anchor -> cos(a_i, n_i) = 1. loss_i = relu(0.2 - 0 + 1) = 1.2.
    anchor = t([[2, 0], [0, 3]])  # norms != 1 to exercise the normalisation
    positive = t([[0, 5], [0.5, 0]])
    for mode in ("hardest", "random"):  # with B = 2 both modes must pick the single other row
        assert_scalar(triplet_loss(anchor, positive, positive, margin=0.2, negatives=mode), 1.2)


def test_triplet_partial_margin_golden() -> None:
    # a = [e1, e2], p = [e1, (1,1)/sqrt2], candidates = p, margin 1.
    # row 0: cos(a0,p0) = 1, negative p1: cos = 1/sqrt2   -> relu(1 - 1 + 1/sqrt2) = 1/sqrt2
    # row 1: cos(a1,p1) = 1/sqrt2, negative p0: cos = 0    -> relu(1 - 1/sqrt2 + 0) = 1 - 1/sqrt2
    # mean = (1/sqrt2 + 1 - 1/sqrt2) / 2 = 0.5
    anchor = t([[2, 0], [0, 3]])
    positive = t([[4, 0], [1, 1]])
    assert_scalar(triplet_loss(anchor, positive, positive, margin=1.0), 0.5)
    # default margin 0.2: row 0 -> relu(0.2 - 1 + 0.707) = 0, row 1 -> relu(0.2 - 0.707) = 0
    assert_scalar(triplet_loss(anchor, positive, positive), 0.0)


def test_triplet_hardest_negative_skips_positive_and_is_golden() -> None:
    anchor, cand = cyclic_candidates()
    assert mine_negatives(anchor, cand, "hardest").tolist() == [2, 0, 1]
    # positive = candidates: cos_pos = 4/sqrt21, hardest cos_neg = 2/sqrt21, margin 0.5
    # loss_i = relu(0.5 - 4/sqrt21 + 2/sqrt21) = 0.5 - 2/sqrt21 (= 0.0636 > 0) for every row.
    assert_scalar(triplet_loss(anchor, cand, cand, margin=0.5, negatives="hardest"), 0.5 - 2 / math.sqrt(21))
    # the easy negative (cos 1/sqrt21) gives relu(0.5 - 3/sqrt21) = 0, so any random draw is <= hardest
    # and, per row, contributes either 0 or the hardest value: mean in {0, 1/3, 2/3, 1} * hardest.
    hardest_value = 0.5 - 2 / math.sqrt(21)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = mine_negatives(anchor, cand, "random", generator=g)
        loss = triplet_loss(anchor, cand, cand, margin=0.5, negatives="random", generator=g)
        assert (idx != torch.arange(3)).all()
        ratio = loss.item() / hardest_value
        assert min(abs(ratio - k / 3) for k in range(4)) < 1e-9


def test_random_negatives_seeded_uniform_and_never_positive() -> None:
    b = 5
    x = torch.randn(b, 4, generator=torch.Generator().manual_seed(1))
    draws_a = [mine_negatives(x, x, "random", torch.Generator().manual_seed(7)) for _ in range(3)]
    assert all(torch.equal(d, draws_a[0]) for d in draws_a)  # same seed -> same negatives

    g = torch.Generator().manual_seed(123)
    draws = torch.stack([mine_negatives(x, x, "random", g) for _ in range(400)])  # (400, B)
    assert (draws != torch.arange(b)).all()  # never the positive index
    assert draws.min() >= 0 and draws.max() < b
    for i in range(b):
        # every j != i shows up (expected 100 times each; P(missing one) ~ 4 * 0.75^400 ~ 1e-50)
        assert set(draws[:, i].tolist()) == set(range(b)) - {i}


def test_triplet_module_seed_reproducible_and_symmetric() -> None:
    img = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    txt = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    m1 = TripletLoss(margin=0.5, negatives="random", seed=11)
    m2 = TripletLoss(margin=0.5, negatives="random", seed=11)
    for _ in range(3):
        a, b = m1(batch(img, txt)), m2(batch(img, txt))
        assert a.keys() == {"triplet_i2t", "triplet_t2i"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    # i2t and t2i are the same function with roles swapped
    hard = TripletLoss(margin=0.5)(batch(img, txt))
    torch.testing.assert_close(hard["triplet_t2i"], triplet_loss(txt, img, img, margin=0.5))
    torch.testing.assert_close(TripletLoss(margin=0.5)(batch(txt, img))["triplet_i2t"], hard["triplet_t2i"])
    assert TripletLoss(symmetric=False)(batch(img, txt)).keys() == {"triplet_i2t"}


def test_triplet_errors_name_values() -> None:
    x = torch.randn(1, 3)
    with pytest.raises(ValueError, match="batch size 1"):
        triplet_loss(x, x, x)
    y = torch.randn(3, 3)
    with pytest.raises(ValueError, match="'semi-hard'"):
        triplet_loss(y, y, y, negatives="semi-hard")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'semi-hard'"):
        TripletLoss(negatives="semi-hard")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        triplet_loss(y, torch.randn(3, 4), y)


def test_triplet_gradient_reaches_selected_rows_only() -> None:
    anchor, cand = cyclic_candidates()
    cand = cand.clone().requires_grad_(True)
    anchor = anchor.clone().requires_grad_(True)
    triplet_loss(anchor, cand, cand, margin=0.5).backward()
    assert anchor.grad is not None and anchor.grad.abs().sum() > 0
    assert cand.grad is not None and cand.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# embedding distillation
# ------------------------------------------------------------------------------------------------


def test_embedding_mse_golden() -> None:
    # diffs (0, 2, 3, 0) -> squares (0, 4, 9, 0) -> mean 13 / 4
    assert_scalar(embedding_mse(t([[1, 2], [3, 4]]), t([[1, 0], [0, 4]])), 13 / 4)


def test_cosine_distance_golden() -> None:
    # row 0: (1,0) vs (2,0) -> cos 1 -> 0; row 1: (1,1) vs (0,5) -> cos 1/sqrt2 -> 1 - 1/sqrt2
    assert_scalar(cosine_distance(t([[1, 0], [1, 1]]), t([[2, 0], [0, 5]])), (1 - 1 / math.sqrt(2)) / 2)
    # opposite directions: 1 - (-1) = 2
    assert_scalar(cosine_distance(t([[1, 0]]), t([[-3, 0]])), 2.0)


def test_embedding_losses_zero_when_identical_and_teacher_gets_no_grad() -> None:
    s = torch.randn(4, 5, dtype=DT, requires_grad=True)
    teacher = s.detach().clone().requires_grad_(True)
    assert_scalar(embedding_mse(s, teacher), 0.0)
    assert_scalar(cosine_distance(s, teacher), 0.0, tol=1e-12)
    s2 = torch.randn(4, 5, dtype=DT, requires_grad=True)
    (embedding_mse(s2, teacher) + cosine_distance(s2, teacher)).backward()
    assert s2.grad is not None and s2.grad.abs().sum() > 0
    assert teacher.grad is None


def test_embedding_module_terms_and_weights() -> None:
    si, st, ti, tt = (torch.randn(3, 4, generator=torch.Generator().manual_seed(k)) for k in range(4))
    image = EmbeddingDistillationLoss()(batch(si, st, ti, tt))
    text = EmbeddingDistillationLoss(tower="text")(batch(si, st, ti, tt))
    assert image.keys() == {"image_mse", "image_cosine"} and text.keys() == {"text_mse", "text_cosine"}
    assert EmbeddingDistillationLoss().terms == ("image_mse", "image_cosine")
    torch.testing.assert_close(image["image_mse"], embedding_mse(si, ti))
    torch.testing.assert_close(text["text_cosine"], cosine_distance(st, tt))

    weighted = EmbeddingDistillationLoss(kind="mse", tower="image", weight=2.5)(batch(si, st, ti, None))
    assert weighted.keys() == {"image_mse"}  # the image tower alone: teacher_text not needed
    torch.testing.assert_close(weighted["image_mse"], 2.5 * embedding_mse(si, ti))
    assert EmbeddingDistillationLoss(kind="mse", weight=0.0)(batch(si, st)) == {}  # weight 0: no teacher needed
    assert EmbeddingDistillationLoss(kind="cosine", tower="text")(batch(si, st, ti, tt)).keys() == {"text_cosine"}


def test_embedding_module_errors() -> None:
    with pytest.raises(ValueError, match="'l1'"):
        EmbeddingDistillationLoss(kind="l1")  # type: ignore[arg-type]
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="teacher_image"):
        EmbeddingDistillationLoss()(batch(x, x))
    with pytest.raises(ValueError, match="teacher_text"):
        EmbeddingDistillationLoss(tower="text")(batch(x, x, x, None))
    with pytest.raises(ValueError, match="-1"):
        EmbeddingDistillationLoss(weight=-1)
    with pytest.raises(ValueError, match="'audio'"):
        EmbeddingDistillationLoss(tower="audio")
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(2, 4\)"):
        embedding_mse(x, torch.randn(2, 4))


# ------------------------------------------------------------------------------------------------
# CLIP contrastive
# ------------------------------------------------------------------------------------------------


def test_contrastive_orthogonal_golden() -> None:
    # img = txt = [e1, e2] -> logits = s * I. Every row (both directions) is CE([s, 0], 0)
    # = -log(e^s / (e^s + 1)) = log(1 + e^-s).
    s = 2.0
    img, txt = t([[3, 0], [0, 2]]), t([[1, 0], [0, 7]])
    assert_scalar(clip_contrastive_loss(img, txt, s), math.log1p(math.exp(-s)))
    assert_scalar(clip_contrastive_loss(img, txt, torch.tensor(s, dtype=DT)), math.log1p(math.exp(-s)))


def test_contrastive_asymmetric_golden() -> None:
    # img = [e1, e2], txt = [e1, (1,1)/sqrt2], r = 1/sqrt2 -> logits = s * [[1, r], [0, r]]
    # image->text: row 0 CE([s, s r], 0) = log(1 + e^{s(r - 1)}); row 1 CE([0, s r], 1) = log(1 + e^{-s r})
    # text->image (logits.T = s [[1, 0], [r, r]]): row 0 log(1 + e^{-s}); row 1 CE([s r, s r], 1) = log 2
    # loss = (mean_i2t + mean_t2i) / 2 = (sum of the four) / 4
    s, r = 3.0, 1 / math.sqrt(2)
    expected = (
        math.log1p(math.exp(s * (r - 1)))
        + math.log1p(math.exp(-s * r))
        + math.log1p(math.exp(-s))
        + math.log(2)
    ) / 4
    assert_scalar(clip_contrastive_loss(t([[1, 0], [0, 1]]), t([[1, 0], [1, 1]]), s), expected)
    # swapping the towers transposes the logits, which the symmetric loss does not notice
    assert_scalar(clip_contrastive_loss(t([[1, 0], [1, 1]]), t([[1, 0], [0, 1]]), s), expected)


def test_contrastive_gradients_reach_embeddings_and_learnable_scale() -> None:
    img = torch.randn(4, 6, dtype=DT, requires_grad=True)
    txt = torch.randn(4, 6, dtype=DT, requires_grad=True)
    log_scale = torch.tensor(math.log(10.0), dtype=DT, requires_grad=True)
    clip_contrastive_loss(img, txt, log_scale.exp()).backward()
    for x in (img, txt, log_scale):
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_contrastive_module_weight_and_errors() -> None:
    img, txt = torch.randn(3, 4), torch.randn(3, 4)
    module = CLIPContrastiveLoss(weight=0.5)
    terms = module(batch(img, txt, logit_scale=100.0))
    assert terms.keys() == {"contrastive"}
    torch.testing.assert_close(terms["contrastive"], 0.5 * clip_contrastive_loss(img, txt, 100.0))
    assert module.last_gathered_batch_size == 3  # single process: gathering is the identity
    assert CLIPContrastiveLoss(weight=0.0)(batch(img, txt)) == {}
    with pytest.raises(ValueError, match="logit_scale"):
        CLIPContrastiveLoss()(batch(img, txt))


# ------------------------------------------------------------------------------------------------
# CLIP-KD affinity distillation
# ------------------------------------------------------------------------------------------------


def kl_rows_by_hand(teacher_cos: list[list[float]], student_cos: list[list[float]], tau: float) -> float:
    """Mean over rows of KL(softmax(teacher/tau) || softmax(student/tau)), pure Python."""

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v / tau) for v in row]
        return [e / sum(exps) for e in exps]

    total = 0.0
    for t_row, s_row in zip(teacher_cos, student_cos, strict=True):
        p, q = softmax(t_row), softmax(s_row)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    return total / len(teacher_cos)


def test_affinity_swapped_captions_closed_form() -> None:
    # teacher cos = I; student captions swapped -> student cos = [[0, 1], [1, 0]]; tau = 0.5 (logits x2)
    # teacher row 0 = softmax([2, 0]) = [q, 1-q], q = e^2 / (1 + e^2); student row 0 = [1-q, q].
    # KL = q log(q/(1-q)) + (1-q) log((1-q)/q) = (2q - 1) * log(e^2) = 2 tanh(1); every row and both
    # directions are alike (the matrices are symmetric), so the loss is 2 tanh(1) ~ 1.5232.
    loss = affinity_distillation_loss(
        t([[1, 0], [0, 1]]), t([[0, 1], [1, 0]]), t([[2, 0], [0, 2]]), t([[3, 0], [0, 3]]), temperature=0.5
    )
    assert_scalar(loss, 2 * math.tanh(1.0))


def test_affinity_asymmetric_by_hand() -> None:
    # teacher: img [e1, e2], txt [e1, (1,1)/sqrt2] -> T = [[1, r], [0, r]], r = 1/sqrt2; student cos = I.
    # image->text compares rows of T and I; text->image compares rows of T.T and I.T = I.
    r, tau = 1 / math.sqrt(2), 0.25
    teacher_cos = [[1.0, r], [0.0, r]]
    teacher_cos_t = [[1.0, 0.0], [r, r]]
    ident = [[1.0, 0.0], [0.0, 1.0]]
    expected = (kl_rows_by_hand(teacher_cos, ident, tau) + kl_rows_by_hand(teacher_cos_t, ident, tau)) / 2
    loss = affinity_distillation_loss(
        t([[1, 0], [0, 1]]), t([[1, 0], [0, 1]]), t([[1, 0], [0, 1]]), t([[1, 0], [1, 1]]), temperature=tau
    )
    assert_scalar(loss, expected)
    # KL is not symmetric in teacher/student, so the swapped roles give a different number
    swapped = (kl_rows_by_hand(ident, teacher_cos, tau) + kl_rows_by_hand(ident, teacher_cos_t, tau)) / 2
    assert_scalar(
        affinity_distillation_loss(
            t([[1, 0], [0, 1]]),
            t([[1, 0], [1, 1]]),
            t([[1, 0], [0, 1]]),
            t([[1, 0], [0, 1]]),
            temperature=tau,
        ),
        swapped,
    )
    assert abs(swapped - expected) > 1e-3


def test_affinity_zero_for_identical_and_width_agnostic() -> None:
    g = torch.Generator().manual_seed(5)
    img, txt = torch.randn(5, 8, generator=g, dtype=DT), torch.randn(5, 8, generator=g, dtype=DT)
    assert_scalar(affinity_distillation_loss(img, txt, img, txt), 0.0, tol=1e-12)
    # only B x B affinities are compared: a teacher of another width (here a rotation padded to 12
    # dims, same cosines) still gives zero
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=DT))
    pad = torch.zeros(5, 4, dtype=DT)
    wide_img, wide_txt = torch.cat([img, pad], 1) @ q, torch.cat([txt, pad], 1) @ q  # (5, 12)
    assert_scalar(affinity_distillation_loss(img, txt, wide_img, wide_txt), 0.0, tol=1e-12)


def test_affinity_gradients_student_only() -> None:
    g = torch.Generator().manual_seed(6)
    s_img, s_txt = (torch.randn(4, 6, generator=g, dtype=DT, requires_grad=True) for _ in range(2))
    t_img, t_txt = (torch.randn(4, 10, generator=g, dtype=DT, requires_grad=True) for _ in range(2))
    affinity_distillation_loss(s_img, s_txt, t_img, t_txt).backward()
    assert s_img.grad is not None and s_img.grad.abs().sum() > 0
    assert s_txt.grad is not None and s_txt.grad.abs().sum() > 0
    assert t_img.grad is None and t_txt.grad is None


def test_affinity_module_weight_and_errors() -> None:
    g = torch.Generator().manual_seed(8)
    si, st, ti, tt = (torch.randn(3, 4, generator=g) for _ in range(4))
    module = AffinityDistillationLoss(temperature=0.1, weight=3.0)
    terms = module(batch(si, st, ti, tt))
    assert terms.keys() == {"affinity"}
    torch.testing.assert_close(terms["affinity"], 3.0 * affinity_distillation_loss(si, st, ti, tt, 0.1))
    assert module.last_gathered_batch_size == 3
    assert AffinityDistillationLoss(weight=0)(batch(si, st)) == {}
    with pytest.raises(ValueError, match="teacher_image"):
        AffinityDistillationLoss()(batch(si, st))
    with pytest.raises(ValueError, match="-0.5"):
        AffinityDistillationLoss(temperature=-0.5)
    with pytest.raises(ValueError, match="3 vs 2"):
        affinity_distillation_loss(si, st, ti[:2], tt[:2])


# ------------------------------------------------------------------------------------------------
# combinator and total
# ------------------------------------------------------------------------------------------------


def test_combinator_merges_and_reports_gathered_size() -> None:
    g = torch.Generator().manual_seed(9)
    si, st = (torch.randn(4, 6, generator=g, requires_grad=True) for _ in range(2))
    ti, tt = (torch.randn(4, 6, generator=g) for _ in range(2))
    combo = CombinedLoss(
        [
            TripletLoss(weight=0.5),
            EmbeddingDistillationLoss(kind="mse", tower="image"),
            EmbeddingDistillationLoss(kind="mse", tower="text"),
            CLIPContrastiveLoss(),
            AffinityDistillationLoss(weight=2.0),
        ]
    )
    assert combo.last_gathered_batch_size is None  # nothing computed yet
    terms = combo(batch(si, st, ti, tt, logit_scale=torch.tensor(50.0)))
    assert terms.keys() == {"triplet_i2t", "triplet_t2i", "image_mse", "text_mse", "contrastive", "affinity"}
    assert combo.last_gathered_batch_size == 4
    loss = total_loss(terms)
    torch.testing.assert_close(loss, sum(terms.values()))
    loss.backward()
    assert si.grad is not None and st.grad is not None
    assert list(combo.parameters()) == []


def test_combinator_and_total_errors() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="triplet_i2t"):
        CombinedLoss([TripletLoss(), TripletLoss(margin=0.1)])(batch(x, x))
    with pytest.raises(ValueError, match="empty"):
        CombinedLoss([])
    with pytest.raises(ValueError, match="empty"):
        total_loss({})


def test_citations() -> None:
    assert "Schroff" in TripletLoss.citation and "2015" in TripletLoss.citation
    assert "Hinton" in EmbeddingDistillationLoss.citation
    assert (
        "Analyzing Student Models in Multi-Modal Knowledge Distillation" in EmbeddingDistillationLoss.citation
    )
    assert "Radford" in CLIPContrastiveLoss.citation and "2021" in CLIPContrastiveLoss.citation
    assert "CLIP-KD" in AffinityDistillationLoss.citation and "Yang" in AffinityDistillationLoss.citation


def test_bfloat16_inputs_are_upcast() -> None:
    g = torch.Generator().manual_seed(10)
    img, txt = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    ref = clip_contrastive_loss(img.bfloat16().float(), txt.bfloat16().float(), 100.0)
    out = clip_contrastive_loss(img.bfloat16(), txt.bfloat16(), 100.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
