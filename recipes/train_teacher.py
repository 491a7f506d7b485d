"""Train a small CLIP teacher from scratch with CLIP's contrastive loss, saved as a stock ``transformers.CLIPModel``.

For offline runs, where no pretrained CLIP can be downloaded: the teacher that ``recipes/clip_student.py`` then
distils. The architecture is an open_clip model config (JSON) or model name; its weights start random.

    accelerate launch --num_processes 1 recipes/train_teacher.py \
        --config recipes/configs/fashion_mnist_teacher.yaml --output_dir out/fmnist-teacher
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/train_teacher.py \
        --config recipes/configs/fashion_mnist_teacher.yaml --output_dir out/fmnist-teacher

Training runs through ``CLIPDistillationTrainer`` with no teacher: with only the ``contrastive`` term (and, if
wanted, the student-only ``triplet`` terms) its loss is plain CLIP training, with embeddings gathered across
processes, checkpoints, resuming and TensorBoard logs as in the distillation recipe.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import set_seed

from mmkd.args import config_errors, parse_args, refuse_token_option, write_training_config
from mmkd.checks import ConfigError
from mmkd.data import CLIPDistillationCollator
from mmkd.data.sources import DataArguments, check_data_args, load_train_dataset
from mmkd.distributed import shutdown
from mmkd.reporting.hardware import hardware_description
from mmkd.students import count_parameters
from mmkd.teachers import check_teacher_spec, load_teacher
from mmkd.trainers import CLIPDistillationConfig, CLIPDistillationTrainer
from mmkd.trainers.checkpoints import LATEST, resolve_resume


@dataclass
class ArchitectureArguments:
    architecture: str = field(
        default="recipes/configs/fashion_mnist_clip.json",
        metadata={"help": "open_clip model config (*.json) or model name giving the architecture; random weights."},
    )


def validate(argv: list[str] | None = None):
    """Parse ``argv`` and check the options before anything is loaded (:class:`~mmkd.checks.ConfigError`)."""
    data_args, arch, args = parse_args(argv, DataArguments, ArchitectureArguments, CLIPDistillationConfig)
    refuse_token_option(args)
    if args.needs_teacher:
        weights = list(dict.fromkeys(t.field for t in args.active_terms().values()
                                     if any(n.startswith("teacher_") for n in t.needs)))
        raise ConfigError(f"{weights[0]}={getattr(args, weights[0])}: train_teacher trains from scratch: set "
                          f"{', '.join(weights)} to 0 (they need a teacher)")
    check_teacher_spec(arch.architecture, option="architecture")
    check_data_args(data_args)
    if args.resume_from_checkpoint and str(args.resume_from_checkpoint).lower() not in LATEST:
        resolve_resume(args.resume_from_checkpoint, args.output_dir, require_optimizer=not args.save_only_model)
    return data_args, arch, args


def main(argv: list[str] | None = None) -> dict:
    with config_errors():
        data_args, arch, args = validate(argv)
        resume = resolve_resume(args.resume_from_checkpoint, args.output_dir, require_optimizer=not args.save_only_model)
    set_seed(args.seed)
    start = time.time()

    # The architecture comes from open_clip's config machinery; the model trained is its exact transformers twin.
    spec = load_teacher(arch.architecture)
    model = spec.to_transformers()
    for p in model.parameters():
        p.requires_grad_(True)
    processor = spec.transformers_processor()
    del spec

    with args.main_process_first(desc="loading the training set"):
        train_dataset = load_train_dataset(data_args)
    trainer = CLIPDistillationTrainer(
        model=model,
        teacher=None,
        args=args,
        train_dataset=train_dataset,
        data_collator=CLIPDistillationCollator(
            processor, image_column=data_args.image_column, text_column=data_args.text_column
        ),
        processing_class=processor,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.save_state()  # trainer_state.json: the logged losses
    summary = {
        "architecture": arch.architecture,
        "parameters": count_parameters(model),
        "world_size": trainer.accelerator.num_processes,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "wall_time_s": round(time.time() - start, 1),
        "hardware": hardware_description(),
        "data": {k: v for k, v in vars(data_args).items()},
    }
    if trainer.is_world_process_zero():
        Path(args.output_dir, "training_summary.json").write_text(json.dumps(summary, indent=2))
        write_training_config(args, data_args, arch)
        print(f"teacher saved to {args.output_dir}: {summary['parameters']['total']:,} parameters, "
              f"{summary['global_step']} steps in {summary['wall_time_s']} s")
    return summary


if __name__ == "__main__":
    main()
    shutdown()  # under a multi-process launch: end the process group cleanly on every rank
