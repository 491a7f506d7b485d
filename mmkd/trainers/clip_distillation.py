"""Distil a CLIP teacher into a CLIP student with ``transformers.Trainer``.

The loss is a weighted sum of the named terms of :data:`CLIP_LOSS_TERMS`, each logged on its own:

* ``triplet_i2t`` / ``triplet_t2i`` - triplet loss between the student's image and text embeddings (its caption vs
  a non-matching caption of the batch), the research project's student objective;
* ``image_mse`` / ``image_cosine`` / ``text_mse`` / ``text_cosine`` - per-tower embedding distillation between
  student and teacher (MSE + cosine was the research's best);
* ``contrastive`` - CLIP's own InfoNCE on the student, with embeddings gathered across processes;
* ``affinity`` - CLIP-KD's soft image-text affinity distillation, gathered across processes;
* ``image_hint`` / ``text_hint``, ``image_attention`` / ``text_attention``, ``image_simkd`` / ``text_simkd`` - the
  feature terms (FitNets hints through training-only projectors, MiniLM attention transfer, SimKD with the teacher's
  projection reused and folded into the saved student; :mod:`mmkd.losses.features`, :mod:`mmkd.trainers.hints`).

The teacher is frozen and never saved; ``save_model`` writes only the student, a stock ``CLIPModel`` with its
processor. When a batch carries cached teacher embeddings the teacher is not run at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mmkd.checks import at_least, between, greater_than, integer_at_least, one_of, optional, probability
from mmkd.data.preprocessing import processor_preprocessing
from mmkd.losses import LossInputs
from mmkd.losses.clip import (
    AffinityDistillationLoss,
    CLIPContrastiveLoss,
    EmbeddingDistillationLoss,
    TripletLoss,
)
from mmkd.losses.features import (
    HINT_KINDS,
    AttentionTransferLoss,
    HintLoss,
    SimKDLoss,
    parse_layer_weights,
)
from mmkd.losses.logits import ClassCELoss, ClassKDLoss, VirtualTeacherLoss, class_embeddings
from mmkd.students.clip import STRATEGIES
from mmkd.students.width import IMPORTANCE
from mmkd.teachers import BACKENDS
from mmkd.teachers.base import pooled_index
from mmkd.trainers.base import DistillationConfig, DistillationTrainer, LossTerm
from mmkd.trainers.class_logits import ClassTargets, check_templates, class_prompts, teacher_class_targets
from mmkd.trainers.hints import (
    HINT_TOKENS,
    PROJECTOR_KINDS,
    PROJECTORS,
    TOWERS,
    FeatureTermsMixin,
    FoldTeacherHead,
    HintProjectors,
)

logger = logging.getLogger(__name__)

__all__ = ["CLIP_LOSS_TERMS", "CLIPDistillationConfig", "CLIPDistillationTrainer"]

DISTILL_KINDS = ("mse_cosine", "mse", "cosine")
NEGATIVES = ("hardest", "random")

_STUDENT = frozenset({"student_image", "student_text"})
_TEACHER = frozenset({"teacher_image", "teacher_text"})


def _per_tower(kind: str) -> frozenset[str]:
    """The student and teacher fields of both towers a feature term reads: ``student_image_<kind>``, ..."""
    return frozenset(f"{side}_{tower}_{kind}" for side in ("student", "teacher") for tower in ("image", "text"))


def _embedding_term(tower: str) -> LossTerm:
    return LossTerm(
        weight=f"{tower}_distill_weight",
        build=lambda a: EmbeddingDistillationLoss(a.distill_loss, tower, getattr(a, f"{tower}_distill_weight")),
        needs=frozenset({f"student_{tower}", f"teacher_{tower}"}),
        checks={"distill_loss": one_of(*DISTILL_KINDS)},
        description=f"embedding distillation (Hinton et al., 2015), {tower} tower",
    )


CLIP_LOSS_TERMS: dict[str, LossTerm] = {
    "triplet": LossTerm(
        weight="triplet_weight",
        build=lambda a: TripletLoss(
            margin=a.triplet_margin, negatives=a.triplet_negatives, weight=a.triplet_weight,
            symmetric=a.triplet_symmetric, seed=a.seed,
        ),
        needs=_STUDENT,
        checks={"triplet_margin": at_least(0), "triplet_negatives": one_of(*NEGATIVES)},
        description="FaceNet triplet loss (Schroff et al., 2015)",
    ),
    "image_distill": _embedding_term("image"),
    "text_distill": _embedding_term("text"),
    "contrastive": LossTerm(
        weight="contrastive_weight",
        build=lambda a: CLIPContrastiveLoss(weight=a.contrastive_weight, gather=a.gather_across_processes,
                                            local_loss=a.local_loss),
        needs=_STUDENT | {"logit_scale"},
        description="CLIP's InfoNCE (Radford et al., 2021)",
    ),
    "affinity": LossTerm(
        weight="affinity_weight",
        build=lambda a: AffinityDistillationLoss(
            temperature=a.affinity_temperature, weight=a.affinity_weight, gather=a.gather_across_processes,
            local_loss=a.local_loss,
        ),
        needs=_STUDENT | _TEACHER,
        checks={"affinity_temperature": greater_than(0)},
        description="CLIP-KD affinity mimicking (Yang et al., 2024)",
    ),
    "hint": LossTerm(
        weight="hint_weight",
        build=lambda a: HintLoss(weight=a.hint_weight, kind=a.hint_loss, layer_weights=a.hint_layer_weights),
        needs=_per_tower("hints"),
        checks={"hint_loss": one_of(*HINT_KINDS), "hint_tokens": one_of(*HINT_TOKENS),
                "projector": one_of(*PROJECTOR_KINDS)},
        description="FitNets hidden-state hints (Romero et al., 2015)",
    ),
    "attention": LossTerm(
        weight="attention_weight",
        build=lambda a: AttentionTransferLoss(weight=a.attention_weight),
        needs=_per_tower("attentions"),
        description="MiniLM self-attention transfer (Wang et al., 2020)",
    ),
    "class_ce": LossTerm(
        weight=lambda a: a.class_kd_weight * (1 - a.class_kd_alpha),
        build=lambda a: ClassCELoss(weight=a.class_kd_weight * (1 - a.class_kd_alpha)),
        needs=frozenset({"student_image", "student_classes", "class_labels", "logit_scale"}),
        checks={"class_kd_weight": at_least(0), "class_kd_alpha": between(0, 1), "class_templates": check_templates},
        description="Hinton KD, hard part: (1 − α)·CE of the student's zero-shot class logits (Hinton et al., 2015)",
        card_weight=lambda a: f"{a.class_kd_weight:g} × (1 − α = {1 - a.class_kd_alpha:g})",
        weight_field="class_kd_weight",
    ),
    "class_kd": LossTerm(
        weight=lambda a: a.class_kd_weight * a.class_kd_alpha,
        build=lambda a: ClassKDLoss(weight=a.class_kd_weight * a.class_kd_alpha, temperature=a.class_kd_temperature),
        needs=frozenset({"student_image", "student_classes", "teacher_image", "teacher_classes",
                         "teacher_logit_scale", "logit_scale"}),
        checks={"class_kd_temperature": greater_than(0)},
        description="Hinton KD, soft part: α·T²·KL(softmax(t/T) ‖ softmax(s/T)) of the zero-shot class logits, "
                    "T = {class_kd_temperature:g} (Hinton et al., 2015)",
        card_weight=lambda a: f"{a.class_kd_weight:g} × (α = {a.class_kd_alpha:g})",
        weight_field="class_kd_weight",
    ),
    "virtual_teacher": LossTerm(
        weight="virtual_teacher_weight",
        build=lambda a: VirtualTeacherLoss(weight=a.virtual_teacher_weight, a=a.virtual_teacher_a,
                                           temperature=a.virtual_teacher_temperature,
                                           gather=a.gather_across_processes),
        needs=_STUDENT | {"logit_scale"},
        checks={"virtual_teacher_a": probability,
                "virtual_teacher_temperature": greater_than(0)},
        description="teacher-free KD: the contrastive targets smoothed toward uniform, a = {virtual_teacher_a:g}, "
                    "T = {virtual_teacher_temperature:g} (Yuan et al., 2020)",
    ),
    "simkd": LossTerm(
        weight="simkd_weight",
        build=lambda a: SimKDLoss(weight=a.simkd_weight),
        needs=_per_tower("feature"),
        description="SimKD: reused teacher projection, feature alignment (Chen et al., 2022)",
    ),
}


@dataclass
class CLIPDistillationConfig(DistillationConfig):
    """Training arguments plus the teacher, the student and the loss of a CLIP distillation run."""

    loss_terms: ClassVar = CLIP_LOSS_TERMS
    # Named layer-selection strategies for the student (mmkd.students.clip); a subclass may extend it.
    layer_strategies: ClassVar = STRATEGIES
    field_checks: ClassVar = {
        "teacher_backend": lambda v: one_of("auto", *BACKENDS)(v),
        "student_vision_layers": optional(at_least(1)),
        "student_text_layers": optional(at_least(1)),
        **{f"student_{tower}_{dim}": optional(integer_at_least(1))
           for tower in ("vision", "text") for dim in ("width", "heads", "mlp_width")},
        "student_width_importance": one_of(*IMPORTANCE),
        "calibration_samples": integer_at_least(1),
    }

    # -- teacher ----------------------------------------------------------------------------------------------
    teacher_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: an open_clip model name (ViT-B-32), hf-hub:org/repo, local-dir:/path, an open_clip "
            "model config *.json, or a transformers CLIPModel hub id / directory. None trains without a teacher."
        },
    )
    teacher_backend: str = field(
        default="auto", metadata={"help": "auto (decided from the teacher spec), open_clip or transformers."}
    )
    # -- student ----------------------------------------------------------------------------------------------
    student_vision_layers: int | None = field(
        default=None, metadata={"help": "Student vision depth; default half the teacher's, rounded up."}
    )
    student_text_layers: int | None = field(
        default=None, metadata={"help": "Student text depth; default half the teacher's, rounded up."}
    )
    student_init: str = field(
        default="every_other",
        metadata={"help": f"Which teacher layers the student copies: {', '.join(STRATEGIES)} (random: from scratch)."},
    )
    student_vision_width: int | None = field(
        default=None, metadata={"help": "Student vision hidden width; default the teacher's (narrower: weights sliced)."}
    )
    student_text_width: int | None = field(
        default=None, metadata={"help": "Student text hidden width; default the teacher's (narrower: weights sliced)."}
    )
    student_vision_heads: int | None = field(
        default=None, metadata={"help": "Student vision heads; default keeps the teacher's head size if it divides "
                                "the width, else its head count."}
    )
    student_text_heads: int | None = field(default=None, metadata={"help": "Student text heads (as for vision)."})
    student_vision_mlp_width: int | None = field(
        default=None, metadata={"help": "Student vision MLP width; default the width times the teacher's MLP ratio."}
    )
    student_text_mlp_width: int | None = field(
        default=None, metadata={"help": "Student text MLP width; default the width times the teacher's MLP ratio."}
    )
    student_width_importance: str = field(
        default="magnitude",
        metadata={"help": f"Which channels, heads and neurons a narrower student keeps: {', '.join(IMPORTANCE)} "
                  "(activation: measured on calibration_samples training rows; first: TinyCLIP's front slices)."},
    )
    calibration_samples: int = field(
        default=64, metadata={"help": "Training rows whose teacher activations rank units (importance=activation)."}
    )
    chain: str | None = field(
        default=None, metadata={"help": "Teacher assistants, largest first: 4,2 (depths) or 4x144,2x96 (depth x "
                                "width); each stage distils the next (mmkd.students.chain)."}
    )

    def student_shape_options(self) -> dict[str, int | None]:
        """The width options as :func:`mmkd.students.build_student` keywords (``vision_width=...``)."""
        return {f"{tower}_{dim}": getattr(self, f"student_{tower}_{dim}")
                for tower in ("vision", "text") for dim in ("width", "heads", "mlp_width")}
    # -- loss ---------------------------------------------------------------------------------------------------
    triplet_weight: float = field(default=1.0, metadata={"help": "Weight of each triplet direction (0 disables)."})
    triplet_margin: float = field(default=0.2, metadata={"help": "Triplet margin, in cosine similarity."})
    triplet_negatives: str = field(
        default="hardest", metadata={"help": "Negative caption / image per anchor: hardest or random in the batch."}
    )
    triplet_symmetric: bool = field(default=True, metadata={"help": "Add the text->image triplet direction."})
    distill_loss: str = field(
        default="mse_cosine", metadata={"help": f"Embedding distillation: {', '.join(DISTILL_KINDS)}."}
    )
    image_distill_weight: float = field(default=1.0, metadata={"help": "Weight of the image-tower distillation."})
    text_distill_weight: float = field(default=1.0, metadata={"help": "Weight of the text-tower distillation."})
    contrastive_weight: float = field(default=0.0, metadata={"help": "Weight of CLIP's InfoNCE on the student."})
    affinity_weight: float = field(default=0.0, metadata={"help": "Weight of CLIP-KD's affinity distillation."})
    affinity_temperature: float = field(
        default=0.05, metadata={"help": "Temperature dividing cosine similarities in the affinity term."}
    )
    gather_across_processes: bool = field(
        default=True, metadata={"help": "Gather embeddings over processes (with gradients) for batch-wide terms."}
    )
    local_loss: bool = field(
        default=False,
        metadata={"help": "open_clip's --local-loss: the contrastive and affinity terms score only this process's "
                          "rows against the gathered batch (b x B logits instead of B x B on every process; the same "
                          "gradients). The virtual-teacher term stays global."},
    )
    hint_weight: float = field(
        default=0.0, metadata={"help": "Weight of the FitNets hidden-state hints, per tower (0 disables)."}
    )
    hint_layers: str = field(
        default="last", metadata={"help": "Hinted student layers: last, all, or indices (0,2); each is paired with "
                                  "the teacher layer it was copied from."}
    )
    hint_layer_weights: str | None = field(
        default=None, metadata={"help": "Comma-separated weight per hinted layer (default: equal)."}
    )
    hint_tokens: str = field(default="all", metadata={"help": "Hinted tokens: all, or pooled (class / end-of-text)."})
    hint_loss: str = field(default="mse", metadata={"help": f"Hint distance: {', '.join(HINT_KINDS)}."})
    attention_weight: float = field(
        default=0.0, metadata={"help": "Weight of the self-attention transfer (KL of the attention distributions)."}
    )
    attention_layers: str = field(
        default="last", metadata={"help": "Student layers whose attention is transferred: last, all or indices; "
                                  "paired as for the hints."}
    )
    simkd_weight: float = field(
        default=0.0, metadata={"help": "Weight of SimKD's feature alignment; > 0 also reuses the teacher's frozen "
                               "projections as the student's head (folded into the saved student's projections)."}
    )
    class_kd_weight: float = field(
        default=0.0, metadata={"help": "Weight of Hinton KD on the zero-shot class logits (needs class labels): "
                               "(1 − α)·CE(student, y) + α·T²·KL(teacher ‖ student) at temperature T."}
    )
    class_kd_alpha: float = field(default=0.5, metadata={"help": "α of the class-logit KD: the soft term's share."})
    class_kd_temperature: float = field(default=4.0, metadata={"help": "T of the class-logit KD (T² convention)."})
    class_templates: list[str] = field(
        default_factory=lambda: ["a photo of a {c}."],
        metadata={"help": "Prompt templates ({c}: the class name) of the class embeddings; the student encodes "
                  "classes × templates prompts every step."},
    )
    virtual_teacher_weight: float = field(
        default=0.0, metadata={"help": "Weight of the teacher-free virtual teacher on the contrastive logits."}
    )
    virtual_teacher_a: float = field(
        default=0.9, metadata={"help": "The virtual teacher's probability of the matching caption / image."}
    )
    virtual_teacher_temperature: float = field(default=1.0, metadata={"help": "T of the virtual teacher."})
    projector: str = field(
        default="linear", metadata={"help": f"Student -> teacher width projector of the hints: "
                                    f"{', '.join(PROJECTOR_KINDS)} (training-only, never saved in the student)."}
    )

    def __post_init__(self):
        if self.student_init not in self.layer_strategies:
            raise ValueError(f"student_init={self.student_init!r}; choose one of {', '.join(self.layer_strategies)}")
        super().__post_init__()


class CLIPDistillationTrainer(FeatureTermsMixin, DistillationTrainer):
    """``Trainer`` that distils a frozen CLIP ``teacher`` into the ``model`` (a ``CLIPModel`` student).

    Args:
        model: the student ``CLIPModel``.
        teacher: a frozen :class:`mmkd.teachers.CLIPTeacher`, or ``None`` when no term needs one (or every batch
            carries cached teacher embeddings).
        args: a :class:`CLIPDistillationConfig`.
        Everything else is passed to ``Trainer``.
    """

    config_class: ClassVar = CLIPDistillationConfig

    def __init__(self, model=None, teacher=None, args: CLIPDistillationConfig = None,
                 class_names: list[str] | None = None, teacher_classes: ClassTargets | None = None, **kwargs):
        self.class_names = list(class_names) if class_names else None
        if args is not None and "student_classes" in args.needed_inputs():
            if not self.class_names:
                raise ValueError("class_kd_weight > 0: the zero-shot class logits need class_names (the training "
                                 "set's class labels, e.g. its ClassLabel names)")
            if args.simkd_weight > 0:
                raise ValueError("class_kd_weight > 0 with simkd_weight > 0: SimKD's inherited head is not applied "
                                 "to the class prompts; use one of them")
            if args.fsdp or args.deepspeed:
                raise ValueError("class_kd_weight > 0 under FSDP / DeepSpeed: the class prompts run through the "
                                 "student's text tower outside its wrapped forward, which sharded parameters do "
                                 "not allow; train with DDP")
            prompts = len(self.class_names) * len(args.class_templates)
            if prompts > 1024:
                logger.warning("class_kd: %d classes x %d templates = %d prompts through the student's text tower "
                               "every step; fewer class_templates make each step cheaper", len(self.class_names),
                               len(args.class_templates), prompts)
        self.hint_pairs: dict[str, list[tuple[int, int]]] = {}
        self.attention_pairs: dict[str, list[tuple[int, int]]] = {}
        active = args.active_terms() if args is not None else {}
        self.simkd = "simkd" in active
        if {"hint", "attention", "simkd"} & active.keys():
            if teacher is None:
                raise ValueError("hint_weight / attention_weight / simkd_weight > 0: these terms need the live "
                                 "teacher's hidden states (a teacher cache holds only embeddings); pass the teacher "
                                 "and drop --teacher_cache_dir")
            if "attention" in active:
                self.attention_pairs = self._plan_pairs(model, teacher, args.attention_layers, "attention_layers")
            widths = {tower: (int(getattr(model.config, f"{TOWERS[tower]}_config").hidden_size),
                              teacher.hidden_widths()[TOWERS[tower]]) for tower in TOWERS}
            if "hint" in active:
                self.hint_pairs = self._plan_pairs(model, teacher, args.hint_layers)
                for pairs in self.hint_pairs.values():  # the layer weights fit the hinted layers, or fail now
                    parse_layer_weights(args.hint_layer_weights, len(pairs))
            projectors = HintProjectors(self.hint_pairs, widths, args.projector, seed=args.seed)
            if self.simkd:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(args.seed + 1)
                    for tower, (d_student, d_teacher) in widths.items():  # bias-free: it folds into the projection
                        head = torch.nn.Linear(d_student, d_teacher, bias=False)
                        self._inherit_head(head, model, tower)
                        projectors[f"{tower}_head"] = head
                # the student's own projections are replaced by the teacher's (and folded in at save time)
                model.visual_projection.requires_grad_(False)
                model.text_projection.requires_grad_(False)
            if args.world_size > 1 and args.ddp_find_unused_parameters and any(True for _ in projectors.parameters()):
                raise ValueError("ddp_find_unused_parameters=true: the hint / SimKD projectors run outside the "
                                 "student's DDP forward, which DDP's unused-parameter search does not allow; train "
                                 "both towers (or set it to false)")
            model.add_module(PROJECTORS, projectors)
        super().__init__(model=model, teacher=teacher, args=args, **kwargs)
        if self.simkd:
            self.add_callback(FoldTeacherHead(self))
            self.callback_handler.callbacks.insert(0, self.callback_handler.callbacks.pop())  # before evaluations
        self.class_prompts: dict[str, torch.Tensor] | None = None
        self.teacher_classes = teacher_classes
        if "student_classes" in self.needed_inputs:
            prompts = class_prompts(self.class_names, args.class_templates)
            tokens = processor_preprocessing(self.processing_class).texts(prompts)
            self.class_prompts = {k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            if "teacher_classes" in self.needed_inputs and teacher_classes is None:
                if teacher is None:
                    raise ValueError("class_kd_weight > 0 with alpha > 0 and no live teacher: pass teacher_classes "
                                     "(teacher_class_targets of the teacher) with cached teacher embeddings")
                self.teacher_classes = teacher_class_targets(teacher, self.class_names, args.class_templates)
        if "logit_scale" not in self.needed_inputs:
            # Only InfoNCE reads the student's temperature; a parameter with no gradient would stall DDP.
            self.accelerator.unwrap_model(self.model).logit_scale.requires_grad_(False)
        self.gathered_batch_size: int | None = None

    def teacher_inputs(self, inputs: dict) -> dict[str, Any]:
        wanted = {tower for tower in ("image", "text") if f"teacher_{tower}" in self.needed_inputs}
        out = {f"teacher_{t}": inputs[f"teacher_{t}_embeds"] for t in wanted if f"teacher_{t}_embeds" in inputs}
        missing = wanted - {name.removeprefix("teacher_") for name in out}
        if self.hint_pairs or self.attention_pairs or self.simkd:  # hidden states come only from the live teacher
            missing = {"image", "text"}
        if not missing:
            return out
        if self.teacher is None:
            raise self.missing_teacher_error("teacher_image_embeds / teacher_text_embeds")
        pixel_values = input_ids = attention_mask = None
        if "image" in missing:
            pixel_values = inputs.get("teacher_pixel_values", inputs["pixel_values"])
        if "text" in missing:
            if "teacher_input_ids" in inputs:
                input_ids, attention_mask = inputs["teacher_input_ids"], inputs.get("teacher_attention_mask")
            else:  # the teacher shares the student's tokenizer
                input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        features = bool(self.hint_pairs or self.attention_pairs) or self.simkd
        live = self.teacher(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=features)
        for tower in missing:
            if tower in wanted:
                out[f"teacher_{tower}"] = getattr(live, f"{tower}_embeds")
            if features:
                states = getattr(live, f"{tower}_hidden_states")
                out[f"_{tower}_hidden"] = states
                if self.simkd:
                    out[f"teacher_{tower}_feature"] = self.teacher.pooled_features(tower, states[-1], input_ids)
        return out

    def student_inputs(self, model, inputs: dict) -> tuple[dict[str, Any], Any]:
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            pixel_values=inputs["pixel_values"],
            output_hidden_states=bool(self.hint_pairs or self.attention_pairs),
            return_dict=True,
        )
        # CLIPModel.forward's tower outputs are get_image_features / get_text_features' own: their pooler_output is
        # the raw projected embedding (forward's image_embeds / text_embeds are normalised).
        image = outputs.vision_model_output.pooler_output  # (B, E)
        text = outputs.text_model_output.pooler_output  # (B, E)
        student = {"student_image": image, "student_text": text}
        if self.simkd:  # SimKD: projector, then the teacher's frozen projection, replace the student's own
            unwrapped = self.accelerator.unwrap_model(model)
            heads = getattr(unwrapped, PROJECTORS)
            vision_last = outputs.vision_model_output.last_hidden_state
            text_last = outputs.text_model_output.last_hidden_state  # after the final LayerNorm
            ids = inputs["input_ids"]
            pooled = {
                "image": unwrapped.vision_model.post_layernorm(vision_last[:, 0]),
                "text": text_last[torch.arange(ids.shape[0], device=text_last.device),
                                  pooled_index(ids, unwrapped.config.text_config.eos_token_id).to(text_last.device)],
            }
            for tower, f_s in pooled.items():
                feature = heads[f"{tower}_head"](f_s)
                student[f"student_{tower}_feature"] = feature
                student[f"student_{tower}"] = feature @ self.teacher.projection(tower).to(feature.dtype).T
        if self.hint_pairs or self.attention_pairs:
            student["_image_hidden"] = outputs.vision_model_output.hidden_states
            student["_text_hidden"] = outputs.text_model_output.hidden_states
        if "logit_scale" in self.needed_inputs:
            student["logit_scale"] = self.accelerator.unwrap_model(model).logit_scale.exp()
        if self.class_prompts is not None:
            # Encoded every step, with gradients: the text tower is being trained, so embeddings cached across
            # steps would be stale and would teach it nothing. The same parameters DDP wraps: their gradients
            # are summed into the one backward DDP synchronises.
            unwrapped = self.accelerator.unwrap_model(model)
            device = inputs["input_ids"].device
            if self.class_prompts["input_ids"].device != device:  # moved once, not every step
                self.class_prompts = {k: v.to(device) for k, v in self.class_prompts.items()}
            prompts = unwrapped.get_text_features(**self.class_prompts)
            student["student_classes"] = class_embeddings(prompts.pooler_output, len(self.class_names))
        return student, outputs

    def loss_inputs(self, student: dict[str, Any], teacher: dict[str, Any]) -> LossInputs:
        extra = self._attentions(student, teacher, self._batch) if self.attention_pairs else {}
        if self.hint_pairs:
            extra.update(self._hints(student, teacher, self._batch))
        if self.attention_pairs and "text_hint_mask" not in extra:  # the attention rows of real tokens
            mask = self._batch.get("attention_mask")
            extra["text_hint_mask"] = mask if mask is not None else torch.ones_like(self._batch["input_ids"])
        for side in (student, teacher):  # the hidden states, read by the terms above only
            for key in [k for k in side if k.startswith("_")]:
                del side[key]
        # Teacher targets in the student's dtype (under mixed precision both come out of autocast).
        teacher = {k: v.to(student[k.replace("teacher_", "student_")].dtype) for k, v in teacher.items()}
        if "class_labels" in self.needed_inputs:
            if "class_labels" not in self._batch:
                raise ValueError("class_kd_weight > 0 but the batch has no class_labels: give the collator the "
                                 "label column (class_column=)")
            extra["class_labels"] = self._batch["class_labels"]
        if "teacher_classes" in self.needed_inputs:
            device = student["student_classes"].device
            extra["teacher_classes"] = self.teacher_classes.embeddings.to(device)
            extra["teacher_logit_scale"] = self.teacher_classes.logit_scale.to(device)
        return LossInputs(**student, **teacher, **extra)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (``_internal_call``) keep the hint projectors, so a resume is exact; the final student is
        saved without them: a stock ``CLIPModel``."""
        student = self.accelerator.unwrap_model(self.model)
        projectors = student._modules.get(PROJECTORS)
        if self.simkd:  # training never reads the student's own projections: folding is harmless at any time
            self.fold_teacher_head()
        if _internal_call or projectors is None:
            return super().save_model(output_dir, _internal_call)
        del student._modules[PROJECTORS]
        try:
            return super().save_model(output_dir, _internal_call)
        finally:
            student._modules[PROJECTORS] = projectors

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._batch = inputs  # the hints read the batch's token ids and mask
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training and self.loss_fn.last_gathered_batch_size is not None:
            self.gathered_batch_size = self.loss_fn.last_gathered_batch_size
        return result

    def extra_logs(self) -> dict[str, float]:
        return {} if self.gathered_batch_size is None else {"gathered_batch_size": self.gathered_batch_size}
