"""The skeleton both distillation trainers share: a config whose loss table drives validation, the teacher decision,
DDP's unused-parameter search and the model card's loss rows, and a ``Trainer`` that sums the table's terms.

A loss table maps a name to a :class:`LossTerm`. Everything a term implies is said once, in its entry: the config
field that weighs it, how to build its module, which :class:`~mmkd.losses.LossInputs` it reads (so whether it needs
the teacher and which student towers it trains), the checks of its options and its row on the model card. Adding a
term is one entry -- in a config subclass, with the fields the term reads::

    @dataclass
    class MyConfig(CLIPDistillationConfig):
        center_weight: float = field(default=0.0, metadata={"help": "..."})
        loss_terms = {**CLIPDistillationConfig.loss_terms, "center": LossTerm(weight="center_weight", ...)}
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from mmkd.checks import Check, ConfigError, at_least, integer_at_least, one_of, optional, run_checks
from mmkd.distributed import prepare_for_sharding, restore_scalars
from mmkd.losses import CombinedLoss, LossInputs, total_loss
from mmkd.teachers.base import FrozenTeacher
from mmkd.trainers.checkpoints import AtomicCheckpoints
from mmkd.trainers.term_logging import LossTermLoggingMixin

__all__ = ["DistillationConfig", "DistillationTrainer", "LossTerm"]

# Training options every distillation run checks before anything is loaded (TrainingArguments leaves them to fail
# later, deep in a data loader or an optimizer).
TRAINING_CHECKS: dict[str, Check] = {
    "per_device_train_batch_size": integer_at_least(1),
    "per_device_eval_batch_size": integer_at_least(1),
    "gradient_accumulation_steps": integer_at_least(1),
    "learning_rate": at_least(0),
    "teacher_dtype": optional(one_of("float32", "bfloat16", "float16")),
    "weight_decay": at_least(0),
    "max_grad_norm": at_least(0),
}

# Which student towers a LossInputs field carries gradients into.
_TOWERS_OF_INPUT = {
    "student_image": {"image"},
    "student_text": {"text"},
    "student_logits": {"image", "text"},  # a matcher's head fuses both towers
    "student_classes": {"text"},  # the class-prompt embeddings of the zero-shot class logits
    **{f"student_{tower}_{kind}": {tower} for tower in ("image", "text")
       for kind in ("hints", "attentions", "feature")},  # the feature terms (mmkd.losses.features)
}


@dataclass(frozen=True)
class LossTerm:
    """One row of a trainer's loss table.

    Args:
        weight: the config field holding the term's weight, or a function of the config (the match trainer's hard
            term weighs ``1 - alpha``). A weight of 0 leaves the term out; a negative one is refused.
        build: config -> the loss module (``forward(LossInputs) -> {term name: weighted scalar}``).
        needs: the :class:`~mmkd.losses.LossInputs` fields the term reads. ``teacher_*`` fields make the run need the
            teacher (or cached teacher outputs); ``student_*`` fields say which student towers it trains.
        checks: ``{config field: check}`` for the options the term reads, run when the config is built.
        description: the model card's "what and where from" cell: a format string over the config's fields, or a
            function of the config.
        card_weight: how the card shows the weight (default: the weight itself).
        weight_field: for a weight that is a function, the config field it scales (what turns the term off at 0);
            for a field name, that name.
    """

    weight: str | Callable[[Any], float]
    build: Callable[[Any], nn.Module]
    needs: frozenset[str]
    checks: Mapping[str, Check] = field(default_factory=dict)
    description: str | Callable[[Any], str] = ""
    card_weight: Callable[[Any], Any] | None = None
    weight_field: str | None = None

    def __post_init__(self):
        unknown = set(self.needs) - set(LossInputs.field_names())
        if unknown:
            raise ValueError(f"LossTerm needs unknown inputs {sorted(unknown)}; LossInputs has {LossInputs.field_names()}")

    @property
    def field(self) -> str | None:
        """The config field whose value 0 turns the term off."""
        return self.weight if isinstance(self.weight, str) else self.weight_field

    def weight_of(self, config: Any) -> float:
        return float(getattr(config, self.weight) if isinstance(self.weight, str) else self.weight(config))

    def describe(self, config: Any) -> str:
        return self.description(config) if callable(self.description) else self.description.format(**vars(config))


@dataclass
class DistillationConfig(TrainingArguments):
    """Training arguments of a distillation run; subclasses add their options and their ``loss_terms`` table."""

    loss_terms: ClassVar[Mapping[str, LossTerm]] = {}
    # Checks of the config's own options (the loss options are checked through their terms).
    field_checks: ClassVar[Mapping[str, Check]] = {}
    # The student's parts that must all get a gradient for DDP to skip its search for unused parameters.
    student_towers: ClassVar[frozenset[str]] = frozenset({"image", "text"})

    teacher_name_or_path: str | None = field(default=None, metadata={"help": "The teacher (see the recipe)."})
    teacher_pretrained: str | None = field(
        default=None,
        metadata={"help": "open_clip only: pretrained tag (laion2b_s34b_b79k, openai) or local checkpoint path."},
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata={"help": "Keep the frozen teacher's weights in this dtype: float32, bfloat16 or float16 (GPU "
                          "only). Default: as loaded. Halves a big teacher's memory and skips mixed precision's "
                          "per-step casts of its weights; the losses read its outputs in float32."},
    )
    # -- Trainer defaults that differ for image-text data -------------------------------------------------------
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the image and text columns for the collator."}
    )

    def __post_init__(self):
        run_checks(self, {**TRAINING_CHECKS, **self.field_checks})
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ConfigError(
                f"max_steps={self.max_steps}: with num_train_epochs={self.num_train_epochs} the run would train 0 "
                "steps (set max_steps > 0 or num_train_epochs > 0)"
            )
        for term in self.loss_terms.values():
            run_checks(self, dict(term.checks))
        for name, term in self.loss_terms.items():
            problem = at_least(0)(term.weight_of(self))
            if problem:
                where = term.weight if isinstance(term.weight, str) else f"the weight of the {name!r} term"
                raise ValueError(f"{where}={term.weight_of(self)!r}: {problem}")
        if not self.active_terms():
            raise ValueError("every loss weight is 0: nothing to train")
        if self.ddp_find_unused_parameters is None:
            # DDP's search for unused parameters is an extra graph traversal per step: on only when a student
            # tower gets no gradient from any active term.
            self.ddp_find_unused_parameters = not self.student_towers <= self.trained_towers()
        super().__post_init__()
        if self.teacher_dtype == "float16" and self.device.type == "cpu":
            raise ConfigError("teacher_dtype='float16': float16 runs only on a GPU; on a CPU use bfloat16 or float32")

    @property
    def teacher_torch_dtype(self) -> torch.dtype | None:
        """``teacher_dtype`` as a torch dtype (``None``: keep the teacher's own)."""
        return None if self.teacher_dtype is None else getattr(torch, self.teacher_dtype)

    # -- derived from the loss table --------------------------------------------------------------------------
    def active_terms(self) -> dict[str, LossTerm]:
        """The table's terms whose weight is above 0, in table order."""
        return {name: term for name, term in self.loss_terms.items() if term.weight_of(self) > 0}

    def needed_inputs(self) -> frozenset[str]:
        """The :class:`~mmkd.losses.LossInputs` fields some active term reads."""
        return frozenset().union(*(term.needs for term in self.active_terms().values()))

    @property
    def needs_teacher(self) -> bool:
        """Whether any active term reads the teacher's outputs."""
        return any(name.startswith("teacher_") for name in self.needed_inputs())

    def trained_towers(self) -> frozenset[str]:
        return frozenset().union(*(_TOWERS_OF_INPUT.get(name, set()) for name in self.needed_inputs()))

    def build_loss(self) -> CombinedLoss:
        """The active terms' modules, combined."""
        return CombinedLoss([term.build(self) for term in self.active_terms().values()])

    def loss_card_rows(self) -> list[dict[str, Any]]:
        """The active terms as the model card shows them: logged names, weight, what, BibTeX of the source."""
        rows = []
        for name, term in self.active_terms().items():
            module = term.build(self)
            rows.append({
                "name": name,
                "terms": list(getattr(module, "terms", (name,))),
                "weight": term.card_weight(self) if term.card_weight else term.weight_of(self),
                "source": term.describe(self),
                "citation": getattr(module, "citation", ""),
            })
        return rows


class DistillationTrainer(LossTermLoggingMixin, AtomicCheckpoints, Trainer, abc.ABC):
    """``Trainer`` that distils a frozen ``teacher`` into ``model`` with the loss of ``args``' table.

    Subclasses say how to read a batch: :meth:`teacher_inputs` (the teacher's outputs, live or cached) and
    :meth:`student_inputs` (one forward of the possibly DDP-wrapped student). Every term is logged on its own;
    checkpoints appear under their final name only when complete (:mod:`mmkd.trainers.checkpoints`).
    """

    config_class: ClassVar[type[DistillationConfig]] = DistillationConfig

    def __init__(self, model=None, teacher: FrozenTeacher | None = None, args: DistillationConfig = None, **kwargs):
        if not isinstance(args, self.config_class):
            raise TypeError(f"args must be a {self.config_class.__name__}, got {type(args).__name__}")
        if teacher is not None and not isinstance(teacher, FrozenTeacher):
            raise TypeError(
                f"teacher must be a frozen mmkd teacher (mmkd.teachers.load_teacher), got {type(teacher).__name__}"
            )
        super().__init__(model=model, args=args, **kwargs)
        # FSDP2 and DeepSpeed fail on CLIPModel's 0-d logit_scale; FSDP2 also asks it for get_input_embeddings()
        sharded = self.accelerator.is_fsdp2 or self.is_deepspeed_enabled
        self._sharding_scalars = prepare_for_sharding(self.model) if sharded else []
        self.loss_fn = args.build_loss()
        self.needed_inputs = args.needed_inputs()
        # The loss is a mean over the micro-batch: let Trainer divide it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        if teacher is not None and args.teacher_torch_dtype not in (None, teacher.dtype):
            teacher.to(args.teacher_torch_dtype)
        # The frozen teacher is replicated, never sharded: evaluation_mode skips DDP/FSDP wrapping, and the explicit
        # device placement is needed because accelerate leaves every model's placement to FSDP under FSDP.
        self.teacher = None if teacher is None else self.accelerator.prepare_model(
            teacher, device_placement=True, evaluation_mode=True
        )

    def _save(self, output_dir: str | None = None, state_dict=None):
        if self._sharding_scalars and state_dict is not None:  # FSDP2 / DeepSpeed hand over the gathered state dict
            state_dict = restore_scalars(dict(state_dict), self._sharding_scalars)
        return super()._save(output_dir, state_dict=state_dict)

    @abc.abstractmethod
    def teacher_inputs(self, inputs: dict) -> dict[str, Any]:
        """The teacher fields of :class:`~mmkd.losses.LossInputs` for this batch."""

    @abc.abstractmethod
    def student_inputs(self, model, inputs: dict) -> tuple[dict[str, Any], Any]:
        """(the student fields of :class:`~mmkd.losses.LossInputs`, the outputs ``compute_loss`` returns)."""

    def loss_inputs(self, student: dict[str, Any], teacher: dict[str, Any]) -> LossInputs:
        return LossInputs(**student, **teacher)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher = self.teacher_inputs(inputs) if self.args.needs_teacher else {}
        # Call the (possibly DDP-wrapped) model itself so gradient synchronisation sees the forward.
        student, outputs = self.student_inputs(model, inputs)
        terms = self.loss_fn(self.loss_inputs(student, teacher))
        loss = total_loss(terms)
        if model.training:
            self.record_terms(terms)
        return (loss, outputs) if return_outputs else loss

    def missing_teacher_error(self, columns: str) -> ValueError:
        return ValueError(
            f"the loss needs the teacher ({', '.join(sorted(n for n in self.needed_inputs if n.startswith('teacher_')))})"
            f" but the trainer has no teacher and the batch has no {columns} columns"
        )
