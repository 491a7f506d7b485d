"""Binary match distillation losses (research 000, section 3.3): golden values worked out by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from mmkd.losses import LossInputs, total_loss
from mmkd.losses.clip import embedding_mse
from mmkd.losses.match import (
    SoftLogitLoss,
    hard_label_loss,
    sigmoid_bce_distillation,
    softmax_one_logit_distillation,
    two_class_kl_distillation,
)
from mmkd.trainers import MatchDistillationConfig


class MatchDistillationLoss:
    """The match trainer's loss, built from its table (``MatchDistillationConfig.build_loss``), called with the
    pair's logits: ``(student_logits, labels, teacher_logits=None, student_image=..., ...)``."""

    def __init__(self, **loss_options):
        self.config = MatchDistillationConfig(output_dir="unused", **loss_options)
        self.module = self.config.build_loss()

    def __call__(self, student_logits, labels, teacher_logits=None, **embeddings):
        return self.module(LossInputs(student_logits=student_logits, labels=labels, teacher_logits=teacher_logits,
                                      **embeddings))

# The worked example used throughout: s = 2, t = −1, T = 2, y = 1.
#   s/T = 1     -> σ(1)    = 0.7310586,  ln σ(1) = −0.3132617,  ln(1 − σ(1)) = ln 0.2689414 = −1.3132617
#   t/T = −0.5  -> σ(−0.5) = 0.3775407
# sigmoid BCE  = −(0.3775407·ln 0.7310586 + 0.6224593·ln 0.2689414)
#              = −(0.3775407·(−0.3132617) + 0.6224593·(−1.3132617)) = 0.1182694 + 0.8174516 = 0.9357210
# teacher entropy H(0.3775407) = −(0.3775407·ln 0.3775407 + 0.6224593·ln 0.6224593) = 0.6628473
# two-class KL = 0.6224593·ln(0.6224593/0.2689414) + 0.3775407·ln(0.3775407/0.7310586)
#              = BCE − H = 0.9357210 − 0.6628473 = 0.2728737
# hard BCE     = −ln σ(2) = ln(1 + e^−2) = 0.1269280
# d(sigmoid BCE)/ds = (σ(s/T) − σ(t/T)) / T = (0.7310586 − 0.3775407) / 2 = 0.1767590
S, T_LOGIT, TEMP = 2.0, -1.0, 2.0
GOLDEN_BCE = 0.9357210
GOLDEN_KL = 0.2728737
GOLDEN_HARD = 0.1269280
GOLDEN_GRAD = 0.1767590


def _t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def _no_warning_loss(**kwargs) -> MatchDistillationLoss:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return MatchDistillationLoss(**kwargs)


# --------------------------------------------------------------------------------------------------
# tensor-only functions
# --------------------------------------------------------------------------------------------------


def test_sigmoid_bce_golden_value_and_gradient():
    s = _t(S, grad=True)
    loss = sigmoid_bce_distillation(s, _t(T_LOGIT), TEMP)
    assert loss.item() == pytest.approx(GOLDEN_BCE, abs=1e-6)
    loss.backward()
    assert s.grad.item() == pytest.approx(GOLDEN_GRAD, abs=1e-6)


def test_sigmoid_bce_golden_batch_mean():
    # Two pairs at T = 3: (s, t) = (2, −1) and (−1, 3).
    # Row 1: s/T = 2/3, t/T = −1/3: σ(2/3) = 0.6607564, σ(−1/3) = 0.4174298
    #   BCE = −(0.4174298·ln 0.6607564 + 0.5825702·ln 0.3392436) = 0.1729704 + 0.6297798 = 0.8027502
    # Row 2: s/T = −1/3, t/T = 1: σ(−1/3) = 0.4174298, σ(1) = 0.7310586
    #   BCE = −(0.7310586·ln 0.4174298 + 0.2689414·ln 0.5825702) = 0.6386812 + 0.1453105 = 0.7839918
    # mean = (0.8027502 + 0.7839918) / 2 = 0.7933710
    loss = sigmoid_bce_distillation(_t(2.0, -1.0), _t(-1.0, 3.0), 3.0)
    assert loss.item() == pytest.approx(0.7933710, abs=1e-6)


def test_two_class_kl_golden_value_and_relation_to_bce():
    kl = two_class_kl_distillation(_t(S), _t(T_LOGIT), TEMP)
    assert kl.item() == pytest.approx(GOLDEN_KL, abs=1e-6)
    # KL = BCE − H(teacher): the same gradient as the sigmoid BCE on random logits.
    torch.manual_seed(0)
    s1 = torch.randn(16, dtype=torch.float64, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    t = 4 * torch.randn(16, dtype=torch.float64)
    p_t = torch.sigmoid(t / 3)
    entropy = -(p_t * p_t.log() + (1 - p_t) * (1 - p_t).log()).mean()
    bce, kl = sigmoid_bce_distillation(s1, t, 3.0), two_class_kl_distillation(s2, t, 3.0)
    torch.testing.assert_close(kl, bce - entropy)
    bce.backward()
    kl.backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_two_class_kl_is_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    t = 5 * torch.randn(32, dtype=torch.float64)
    s = t.clone().requires_grad_(True)
    kl = two_class_kl_distillation(s, t, 3.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-12)
    kl.backward()
    torch.testing.assert_close(s.grad, torch.zeros_like(s), atol=1e-12, rtol=0)


def test_sigmoid_bce_is_minimised_at_the_teacher_logit():
    t = _t(-1.5, 0.0, 2.5)
    s = t.clone().requires_grad_(True)
    at_teacher = sigmoid_bce_distillation(s, t, 3.0)
    at_teacher.backward()
    torch.testing.assert_close(s.grad, torch.zeros_like(s), atol=1e-12, rtol=0)
    # The minimum value is the teacher's entropy, not 0 (BCE = KL + H).
    p_t = torch.sigmoid(t / 3)
    entropy = -(p_t * p_t.log() + (1 - p_t) * (1 - p_t).log()).mean()
    assert at_teacher.item() == pytest.approx(entropy.item(), abs=1e-12)
    for delta in (-1.0, -0.1, 0.1, 1.0):
        assert sigmoid_bce_distillation(t + delta, t, 3.0).item() > at_teacher.item()


def test_hard_label_loss_golden_and_label_dtypes():
    # y = 1: −ln σ(2) = 0.1269280;  y = 0 with s = −1: −ln(1 − σ(−1)) = −ln σ(1) = 0.3132617
    # mean = (0.1269280 + 0.3132617) / 2 = 0.2200949
    s = _t(2.0, -1.0)
    assert hard_label_loss(s[:1], torch.tensor([1])).item() == pytest.approx(GOLDEN_HARD, abs=1e-6)
    for labels in (torch.tensor([1, 0]), torch.tensor([True, False]), torch.tensor([1.0, 0.0]),
                   torch.tensor([[1], [0]])):
        assert hard_label_loss(s, labels).item() == pytest.approx(0.2200949, abs=1e-6)


def test_softmax_one_logit_is_identically_zero_with_zero_gradient():
    torch.manual_seed(0)
    s = (10 * torch.randn(8)).requires_grad_(True)
    t = 10 * torch.randn(8)
    loss = softmax_one_logit_distillation(s, t, 3.0)
    assert loss.item() == 0.0
    assert loss.requires_grad  # still in the graph: backward runs, the gradient is exactly 0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_feature_distillation_golden_and_teacher_detached():
    # diffs = [[1, 0], [0, −2]] -> MSE = (1 + 0 + 0 + 4) / 4 = 1.25
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 2.0], [3.0, 6.0]], requires_grad=True)
    loss = embedding_mse(student, teacher)  # the feature term's maths
    assert loss.item() == pytest.approx(1.25)
    loss.backward()
    assert teacher.grad is None
    # d/dstudent = 2·diff / 4 = [[0.5, 0], [0, −1]]
    torch.testing.assert_close(student.grad, torch.tensor([[0.5, 0.0], [0.0, -1.0]]))


def test_logit_shapes_b1_and_b_are_equivalent():
    s, t = _t(2.0, -1.0, 0.3), _t(-1.0, 3.0, 0.0)
    for fn in (sigmoid_bce_distillation, two_class_kl_distillation):
        torch.testing.assert_close(fn(s[:, None], t[:, None], 2.0), fn(s, t, 2.0))
        torch.testing.assert_close(fn(s[:, None], t, 2.0), fn(s, t, 2.0))


def test_teacher_receives_no_gradient():
    s = _t(2.0, -1.0, grad=True)
    t = _t(-1.0, 3.0, grad=True)
    for fn in (sigmoid_bce_distillation, two_class_kl_distillation, softmax_one_logit_distillation):
        fn(s, t, 3.0).backward()
    assert t.grad is None


def test_half_precision_is_upcast():
    s = torch.tensor([2.0, -1.0], dtype=torch.bfloat16)
    t = torch.tensor([-1.0, 3.0], dtype=torch.bfloat16)
    assert sigmoid_bce_distillation(s, t, 3.0).dtype == torch.float32
    assert two_class_kl_distillation(s, t, 3.0).dtype == torch.float32
    assert hard_label_loss(s, torch.tensor([1, 0])).dtype == torch.float32


def test_saturated_logits_stay_finite():
    s = _t(100.0, -100.0, grad=True)
    t = _t(-100.0, 100.0)
    for fn in (sigmoid_bce_distillation, two_class_kl_distillation):
        loss = fn(s, t, 1.0)
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(s.grad).all()
    assert torch.isfinite(hard_label_loss(s, torch.tensor([0, 1])))


@pytest.mark.parametrize("fn", [sigmoid_bce_distillation, two_class_kl_distillation, softmax_one_logit_distillation])
def test_function_argument_errors(fn):
    with pytest.raises(ValueError, match=r"same batch size.*\(3,\) and \(2,\)"):
        fn(torch.zeros(3), torch.zeros(2), 3.0)
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, 1\).*\(3, 2\)"):
        fn(torch.zeros(3, 2), torch.zeros(3, 2), 3.0)
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, 1\).*\(\)"):
        fn(torch.tensor(1.0), torch.tensor(1.0), 3.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=f"temperature must be > 0, got {bad}"):
            fn(torch.zeros(3), torch.zeros(3), bad)


def test_label_and_feature_shape_errors():
    with pytest.raises(ValueError, match=r"student_logits and labels.*\(4,\) and \(3,\)"):
        hard_label_loss(torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3\) and \(2, 4\)"):
        embedding_mse(torch.zeros(2, 3), torch.zeros(2, 4))  # the feature term's maths
    with pytest.raises(ValueError, match=r"teacher must be a 2-D.*\(2,\)"):
        embedding_mse(torch.zeros(2, 3), torch.zeros(2))


# --------------------------------------------------------------------------------------------------
# MatchDistillationLoss
# --------------------------------------------------------------------------------------------------


def test_module_default_is_the_research_setting_golden():
    cfg = _no_warning_loss().config
    assert (cfg.alpha, cfg.temperature, cfg.distill_form, cfg.t2_scaling, cfg.feature_weight) == (
        0.5, 3.0, "sigmoid_bce", False, 0.0
    )
    # α = 0.5, T = 2 on the worked example: hard = 0.5·0.1269280 = 0.0634640, soft = 0.5·0.9357210 = 0.4678605
    terms = MatchDistillationLoss(alpha=0.5, temperature=TEMP)(_t(S), torch.tensor([1]), _t(T_LOGIT))
    assert set(terms) == {"hard", "soft"}
    assert terms["hard"].item() == pytest.approx(0.0634640, abs=1e-6)
    assert terms["soft"].item() == pytest.approx(0.4678605, abs=1e-6)
    assert total_loss(terms).item() == pytest.approx(0.5313245, abs=1e-6)


def test_module_kl_form_golden():
    terms = MatchDistillationLoss(alpha=0.25, temperature=TEMP, distill_form="kl_two_class")(
        _t(S), torch.tensor([1.0]), _t(T_LOGIT)
    )
    # hard = 0.75·0.1269280 = 0.0951960, soft = 0.25·0.2728737 = 0.0682184
    assert terms["hard"].item() == pytest.approx(0.0951960, abs=1e-6)
    assert terms["soft"].item() == pytest.approx(0.0682184, abs=1e-6)


@pytest.mark.parametrize("form", ["sigmoid_bce", "kl_two_class"])
@pytest.mark.parametrize("temperature", [0.5, 2.0, 3.0, 4.0])
def test_t2_scaling_multiplies_the_soft_term_by_t_squared(form, temperature):
    torch.manual_seed(0)
    s, t, y = torch.randn(8), 3 * torch.randn(8), (torch.rand(8) > 0.5).long()
    plain = MatchDistillationLoss(alpha=0.5, temperature=temperature, distill_form=form)(s, y, t)
    scaled = MatchDistillationLoss(alpha=0.5, temperature=temperature, distill_form=form, t2_scaling=True)(s, y, t)
    # α = 0.5 is a power of two, so α·d is exact and both sides round the same real α·T²·d once: bitwise equal.
    assert torch.equal(scaled["soft"], plain["soft"] * temperature**2)
    assert torch.equal(scaled["hard"], plain["hard"])  # the hard term never gets T²


def test_t2_scaling_keeps_the_gradient_magnitude_comparable_across_temperatures():
    # Hinton's argument: the soft gradient is ≈ (s − t)/(4·T²·B) for large T; T² cancels it.
    s0, t = torch.tensor([0.4]), torch.tensor([-0.4])
    grads = []
    for temperature in (5.0, 10.0, 20.0):
        s = s0.clone().requires_grad_(True)
        MatchDistillationLoss(alpha=1.0, temperature=temperature, t2_scaling=True)(s, torch.tensor([1]), t)[
            "soft"
        ].backward()
        grads.append(s.grad.item())
    # (0.4 − (−0.4)) / 4 = 0.2 at every T, to within the curvature of σ
    assert grads == pytest.approx([0.2, 0.2, 0.2], rel=2e-3)


def test_alpha_zero_gives_only_hard_without_teacher():
    s, y = _t(S), torch.tensor([1])
    terms = MatchDistillationLoss(alpha=0.0)(s, y)
    assert list(terms) == ["hard"]
    assert terms["hard"].item() == pytest.approx(GOLDEN_HARD, abs=1e-6)


def test_alpha_one_gives_only_soft():
    terms = MatchDistillationLoss(alpha=1.0, temperature=TEMP)(_t(S), torch.tensor([1]), _t(T_LOGIT))
    assert list(terms) == ["soft"]
    assert terms["soft"].item() == pytest.approx(GOLDEN_BCE, abs=1e-6)


def test_softmax_one_logit_module_warns_and_is_zero():
    with pytest.warns(UserWarning, match="identically zero.*no learning signal"):
        loss_fn = MatchDistillationLoss(alpha=1.0, distill_form="softmax_one_logit")
    s = _t(2.0, -3.0, grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning per forward, only at construction
        terms = loss_fn(s, torch.tensor([1, 0]), _t(-1.0, 5.0))
    assert terms["soft"].item() == 0.0
    terms["soft"].backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_feature_terms():
    si, st = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 2)
    ti, tt = torch.tensor([[0.0, 2.0], [3.0, 6.0]]), torch.ones(2, 2)
    terms = MatchDistillationLoss(alpha=0.0, feature_weight=0.1)(
        torch.zeros(2), torch.tensor([1, 0]), student_image=si, student_text=st, teacher_image=ti, teacher_text=tt
    )
    assert set(terms) == {"hard", "image_feature", "text_feature"}
    assert terms["image_feature"].item() == pytest.approx(0.125)  # 0.1·1.25
    assert terms["text_feature"].item() == pytest.approx(0.1)  # 0.1·mean((0 − 1)²)
    assert "image_feature" not in MatchDistillationLoss(alpha=0.0)(
        torch.zeros(2), torch.tensor([1, 0]), student_image=si, teacher_image=ti
    )


def test_module_accepts_b1_logits():
    s, t, y = _t(2.0, -1.0), _t(-1.0, 3.0), torch.tensor([1, 0])
    loss_fn = MatchDistillationLoss()
    flat, column = loss_fn(s, y, t), loss_fn(s[:, None], y[:, None], t[:, None])
    for name in flat:
        torch.testing.assert_close(column[name], flat[name])


def test_module_backward_reaches_student_only():
    s = torch.randn(4, requires_grad=True)
    t = torch.randn(4, requires_grad=True)
    total_loss(MatchDistillationLoss()(s, torch.tensor([1, 0, 1, 0]), t)).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert t.grad is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -0.1}, "alpha=-0.1: must be in \\[0, 1\\]"),
        ({"alpha": 1.5}, "alpha=1.5: must be in \\[0, 1\\]"),
        ({"alpha": float("nan")}, "alpha=nan: must be in \\[0, 1\\]"),
        ({"temperature": 0.0}, "temperature=0.0: must be > 0"),
        ({"temperature": -3}, "temperature=-3: must be > 0"),
        ({"distill_form": "softmax"}, "distill_form='softmax': choose one of sigmoid_bce"),
        ({"feature_weight": -1.0}, "feature_weight=-1.0: must be >= 0"),
    ],
)
def test_module_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MatchDistillationLoss(**kwargs)


def test_module_missing_inputs_errors():
    s, y = torch.zeros(2), torch.tensor([1, 0])
    with pytest.raises(ValueError, match="SoftLogitLoss requires teacher_logits"):
        MatchDistillationLoss()(s, y)
    with pytest.raises(ValueError, match="FeatureDistillationLoss requires student_image"):
        MatchDistillationLoss(alpha=0.0, feature_weight=1.0)(s, y)
    with pytest.raises(ValueError, match="FeatureDistillationLoss requires teacher_text"):
        MatchDistillationLoss(alpha=0.0, feature_weight=1.0)(
            s, y, student_image=torch.zeros(2, 3), student_text=torch.zeros(2, 3), teacher_image=torch.zeros(2, 3)
        )
    with pytest.raises(ValueError, match=r"student_logits and labels.*\(2,\) and \(3,\)"):
        MatchDistillationLoss(alpha=0.5)(s, torch.tensor([1, 0, 1]), torch.zeros(2))
    with pytest.raises(ValueError, match=r"student_logits and teacher_logits.*\(2,\) and \(3,\)"):
        MatchDistillationLoss()(s, y, torch.zeros(3))


def test_module_metadata():
    loss_fn = SoftLogitLoss(weight=0.25, temperature=2.0, t2_scaling=True)
    assert "hinton2015distilling" in loss_fn.citation
    assert "Fysikoudi" in loss_fn.citation
    assert loss_fn.scale == pytest.approx(0.25 * 4.0)
    assert "form='sigmoid_bce'" in repr(loss_fn) and "t2_scaling=True" in repr(loss_fn)
    assert not list(MatchDistillationLoss(alpha=0.25, feature_weight=1.0).module.parameters())
    assert math.isclose(SoftLogitLoss().scale, 0.5)
