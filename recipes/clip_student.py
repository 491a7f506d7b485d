"""Distil a CLIP teacher into a half-depth CLIP student and save it as a stock ``transformers.CLIPModel``.

One process (CPU, or one GPU):
    accelerate launch --num_processes 1 recipes/clip_student.py --config recipes/configs/smoke.yaml --output_dir out/smoke
    python recipes/clip_student.py --config recipes/configs/smoke.yaml --output_dir out/smoke

Two processes on the CPU (accelerate's ``--cpu`` flag silently starts one; this starts two with the gloo backend):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/clip_student.py \
        --config recipes/configs/smoke.yaml --output_dir out/smoke2
    torchrun --nproc_per_node 2 recipes/clip_student.py --config recipes/configs/smoke.yaml --output_dir out/smoke2

Eight GPUs, bf16, ViT-B/32 teacher on Conceptual Captions:
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 recipes/clip_student.py \
        --config recipes/configs/vit_b32_cc3m.yaml --output_dir out/vit-b32-half

Teacher assistants: ``--chain 4,2`` (or ``4x144,2x96``, depth x width) trains teacher -> 4 layers -> 2 layers -> the
student of the run's ``student_*`` options, each stage the next one's teacher (``<output_dir>/assistants/``); a
finished stage is reused and an interrupted one resumes when the command is run again (``mmkd.students.chain``).

Any option of the YAML file can be overridden on the command line (``--max_steps 100``); ``--help`` lists them.
Resume an interrupted run with ``--resume_from_checkpoint latest`` (or ``true``: the latest *complete* checkpoint of
``--output_dir``) or a path, ``out/smoke/checkpoint-20``. Checkpoints are written atomically, so a kill mid-save
never leaves one that a resume would pick.
The result loads without mmkd:
    pipeline("zero-shot-image-classification", model="out/smoke")

Push the student to the Hub at the end of training with Trainer's own options:
    accelerate launch recipes/clip_student.py --config recipes/configs/vit_b32_cc3m.yaml --output_dir out/vit-b32-half \
        --push_to_hub true --hub_model_id me/clip-vit-b32-half [--hub_private_repo true]
The token comes from ``HF_TOKEN`` or ``huggingface-cli login``; ``--hub_token`` is refused (it would reach child
processes' argv and the saved arguments).
The recipe, not Trainer, pushes: Trainer with ``push_to_hub`` would create the repository over the network in its
constructor (failing an offline machine before the first step) and upload every checkpoint. Here training and the
local save never touch the network; once the student is saved, the main process writes its model card
(``README.md``, naming the repository) and uploads one commit through ``mmkd.hub.push_folder``: weights, config,
processor, card and the run's JSON records, never checkpoints, optimizer states or ``runs/``. So ``--hub_strategy``
has no effect (no intermediate pushes), ``--hub_model_id`` defaults to the output folder's name in the token's
namespace, ``--hub_revision`` picks the branch, and ``training_config.json`` records ``push_to_hub: false`` (a re-run
from it does not push again). A failed push (no network, ``HF_HUB_OFFLINE``, a refused token) ends the run with one
line and exit status 1 after the student is saved; push the folder later with
``mmkd push out/vit-b32-half --repo-id me/clip-vit-b32-half``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from accelerate import PartialState
from transformers import set_seed

from mmkd import args as recipe_args
from mmkd.args import command_line, config_errors, refuse_token_option, run_inputs, write_training_config
from mmkd.checks import ConfigError
from mmkd.data import CLIPDistillationCollator
from mmkd.data.cache import cache_teacher_embeddings
from mmkd.data.sidecars import ViewSpec, build_sidecars, stream_with_sidecars
from mmkd.data.sources import (
    DataArguments,
    check_data_args,
    class_names,
    describe_dataset,
    load_train_dataset,
)
from mmkd.distributed import shutdown
from mmkd.losses.features import parse_layer_weights
from mmkd.reporting.hardware import hardware_description
from mmkd.students import build_student, count_parameters
from mmkd.students.chain import CHAIN_RECORD, check_chain, parse_chain
from mmkd.students.clip import student_depth
from mmkd.students.width import resolve_width
from mmkd.teachers import check_teacher_spec, load_teacher, teacher_shapes
from mmkd.trainers import CLIPDistillationConfig, CLIPDistillationTrainer
from mmkd.trainers.checkpoints import LATEST, latest_checkpoint, resolve_resume
from mmkd.trainers.class_logits import teacher_class_targets
from mmkd.trainers.hints import parse_hint_layers

logger = logging.getLogger(__name__)


# 1. Arguments, teacher and student --------------------------------------------------------------------------------
def parse_args(
    argv: list[str] | None = None,
    config_class: type[CLIPDistillationConfig] = CLIPDistillationConfig,
    data_class: type[DataArguments] = DataArguments,
) -> tuple[DataArguments, CLIPDistillationConfig]:
    """The data arguments and the training config of ``argv`` (an optional YAML ``--config`` under the command line)."""
    return recipe_args.parse_args(argv, data_class, config_class)


def build_models(args: CLIPDistillationConfig, calibration_rows: list[dict] | None = None,
                 image_column: str = "image", text_column: str = "text"):
    """Load the frozen teacher and build its student (a stock CLIPModel of the requested depth and width) with the
    student's processor. ``calibration_rows`` (training rows) rank the units a narrower student keeps when
    ``student_width_importance`` is ``activation``."""
    teacher = load_teacher(args.teacher_name_or_path, pretrained=args.teacher_pretrained, backend=args.teacher_backend)
    full = teacher.to_transformers()
    processor = teacher.transformers_processor()
    calibration = None
    if args.student_width_importance == "activation" and calibration_rows:
        calibration = processor(images=[row[image_column].convert("RGB") for row in calibration_rows],
                                text=[row[text_column] for row in calibration_rows], return_tensors="pt",
                                padding="max_length", truncation=True,
                                max_length=full.config.text_config.max_position_embeddings)
    student, init = build_student(
        full,
        vision_depth=args.student_vision_layers,
        text_depth=args.student_text_layers,
        strategy=args.student_init,
        **args.student_shape_options(),
        importance=args.student_width_importance,
        calibration=calibration,
        teacher_name=teacher.name,
        seed=args.seed,
        strategies=args.layer_strategies,
        allow_full_depth=args.student_init == "random",  # a same-size student from scratch (born-again KD)
    )
    counts = {"teacher": count_parameters(full), "student": count_parameters(student)}
    if args.teacher_torch_dtype is not None:  # after the student took its float32 copy of the teacher's weights
        teacher.to(args.teacher_torch_dtype)
    return teacher, student, processor, init, counts


def calibration_rows(dataset, n: int) -> list[dict]:
    """The first ``n`` rows of a map-style or streaming training set."""
    if hasattr(dataset, "select"):
        return [dataset[i] for i in range(min(n, len(dataset)))]
    return list(dataset.take(n))


def validate(
    argv: list[str] | None = None,
    config_class: type[CLIPDistillationConfig] = CLIPDistillationConfig,
    data_class: type[DataArguments] = DataArguments,
    check_teacher: bool = True,
) -> tuple[DataArguments, CLIPDistillationConfig]:
    """Parse ``argv`` and check every option that can be checked without loading a model or a dataset; raises
    :class:`~mmkd.checks.ConfigError` naming the option. ``check_teacher=False`` skips the teacher spec (the offline
    job checks a stage whose teacher an earlier stage writes)."""
    data_args, args = parse_args(argv, config_class, data_class)
    if args.chain:
        stages = parse_chain(args.chain)
        shapes = teacher_shapes(args.teacher_name_or_path) if check_teacher else None
        if check_teacher and not shapes:
            raise ConfigError(f"chain={args.chain}: needs a teacher whose shape is known before it loads (a local "
                              f"folder, an open_clip name or config), not {args.teacher_name_or_path}; download it "
                              "first (huggingface-cli download) and pass the folder")
        if shapes:  # the chain against the teacher: every model smaller than its teacher, before any stage trains
            check_teacher_spec(args.teacher_name_or_path, args.teacher_pretrained, args.teacher_backend)
            teacher = {tower: (shape.layers, shape.width) for tower, shape in shapes.items()}
            student = {tower: (student_depth(shape.layers, getattr(args, f"student_{tower}_layers")),
                               getattr(args, f"student_{tower}_width")) for tower, shape in shapes.items()}
            check_chain(args.chain, stages, teacher, student)
        check_args(data_args, args, check_teacher=False)
        return data_args, args
    return check_args(data_args, args, check_teacher)


def check_args(data_args: DataArguments, args: CLIPDistillationConfig, check_teacher: bool = True
               ) -> tuple[DataArguments, CLIPDistillationConfig]:
    """:func:`validate`'s checks of parsed arguments (a chain stage's are checked once its teacher exists)."""
    refuse_token_option(args)
    shapes = {}
    if check_teacher:
        check_teacher_spec(args.teacher_name_or_path, args.teacher_pretrained, args.teacher_backend)
        shapes = teacher_shapes(args.teacher_name_or_path) or {}
        options = args.student_shape_options()
        for tower, shape in shapes.items():
            depth = getattr(args, f"student_{tower}_layers")
            same_size = args.student_init == "random" and depth == shape.layers  # born-again: same shape, fresh
            if depth is not None and depth >= shape.layers and not same_size:
                raise ConfigError(f"student_{tower}_layers={depth}: the teacher has {shape.layers} {tower} layers; "
                                  "a student has fewer (or as many with student_init=random)")
            resolve_width(shape, tower, *(options[f"{tower}_{dim}"] for dim in ("width", "heads", "mlp_width")))
    elif args.teacher_name_or_path is None:
        raise ConfigError("teacher_name_or_path=None: required (the student's architecture is derived from it)")
    check_data_args(data_args)
    features = {"hint_weight": args.hint_weight, "attention_weight": args.attention_weight,
                "simkd_weight": args.simkd_weight}
    for option in ("teacher_cache_dir", "teacher_sidecar_dir"):
        if any(w > 0 for w in features.values()) and getattr(data_args, option):
            raise ConfigError(f"{option}={getattr(data_args, option)}: {', '.join(k for k, w in features.items() if w > 0)}"
                              " > 0 needs the live teacher's hidden states, which the cache does not hold; drop one of them")
    for tower, shape in shapes.items():  # the layer choices against the student's depth
        depth = student_depth(shape.layers, getattr(args, f"student_{tower}_layers"),
                              allow_full_depth=args.student_init == "random")
        try:
            if args.hint_weight > 0:
                parse_layer_weights(args.hint_layer_weights, len(parse_hint_layers(args.hint_layers, depth, tower)))
            if args.attention_weight > 0:
                parse_hint_layers(args.attention_layers, depth, tower, option="attention_layers")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if args.resume_from_checkpoint and str(args.resume_from_checkpoint).lower() not in LATEST:
        resolve_resume(args.resume_from_checkpoint, args.output_dir, require_optimizer=not args.save_only_model)  # a path: complete, or refused now
    return data_args, args


def main(
    argv: list[str] | None = None,
    config_class: type[CLIPDistillationConfig] = CLIPDistillationConfig,
    data_class: type[DataArguments] = DataArguments,
) -> dict:
    """Run the recipe; ``config_class`` / ``data_class`` are subclasses with more loss terms, layer strategies or
    data sources in their tables (see :mod:`mmkd.trainers.base` and :mod:`mmkd.data.sources`). A bad option ends
    the run with one line and exit status 2 before anything is loaded."""
    with config_errors():
        data_args, args = validate(argv, config_class, data_class)
        if args.chain:
            return run_chain(argv, data_args, args, config_class, data_class)
        resume = resolve_resume(args.resume_from_checkpoint, args.output_dir, require_optimizer=not args.save_only_model)
    return train(data_args, args, resume, argv)


def run_chain(argv, data_args: DataArguments, args: CLIPDistillationConfig,
              config_class: type[CLIPDistillationConfig], data_class: type[DataArguments]) -> dict:
    """Teacher assistants (:mod:`mmkd.students.chain`): train each stage with the run's options, its teacher the
    stage before; a finished stage (same arguments) is reused, an interrupted one resumes from its latest complete
    checkpoint. Returns the final student's summary with the chain's stages."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(args.output_dir)
    stages = parse_chain(args.chain)
    teacher, done = args.teacher_name_or_path, []
    # the student's default depth is half the first teacher's (what the chain was checked against), not its own's
    final_depths = {tower: student_depth(shape.layers, getattr(args, f"student_{tower}_layers"))
                    for tower, shape in (teacher_shapes(args.teacher_name_or_path) or {}).items()}
    for i, stage in enumerate([*stages, None]):
        folder = out if stage is None else out / "assistants" / f"{i + 1}-{stage.label}"
        with config_errors():
            stage_data, stage_args = parse_args([*argv, "--teacher_name_or_path", str(teacher), "--output_dir",
                                                 str(folder)], config_class, data_class)
            stage_args.chain = None
            if i > 0:  # the teacher is now the previous stage's CLIPModel folder
                stage_args.teacher_pretrained, stage_args.teacher_backend = None, "auto"
            if stage is not None:  # an assistant: the stage's shape; the student's own options are for the last
                for tower in ("vision", "text"):
                    setattr(stage_args, f"student_{tower}_layers", stage.layers)
                    for dim in ("width", "heads", "mlp_width"):
                        setattr(stage_args, f"student_{tower}_{dim}", stage.width if dim == "width" else None)
                stage_args.push_to_hub = False
            else:
                for tower, depth in final_depths.items():
                    setattr(stage_args, f"student_{tower}_layers", depth)
            stage_argv = [*argv, "--teacher_name_or_path", str(teacher)]
            record = {"teacher": str(teacher), "stage": stage.label if stage else "student", "argv": argv,
                      "inputs": run_inputs(stage_argv)}  # the YAML's content and the stage's teacher weights
            marker = folder / CHAIN_RECORD
            stored = read_chain_record(marker)
            reuse = stored.get("record") == record and stored.get("complete") is True
            if not reuse:  # the stage against its teacher, which exists now
                check_args(stage_data, stage_args)
                if stored.get("record") == record:  # this very stage was interrupted: continue it
                    resume = resolve_resume("latest", folder, require_optimizer=not stage_args.save_only_model)
                elif latest_checkpoint(folder, require_optimizer=False) is not None:
                    raise ConfigError(f"chain={args.chain}: {folder} holds checkpoints of another run (other "
                                      "arguments, config or teacher); delete them or choose another --output_dir")
                else:
                    resume = None
        if reuse:
            logger.info("chain stage %d (%s): finished run in %s reused", i + 1, record["stage"], folder)
            summary = json.loads((folder / "training_summary.json").read_text())
        else:
            if PartialState().is_main_process:
                print(f"chain stage {i + 1} of {len(stages) + 1}: {record['stage']} from {teacher} -> {folder}",
                      flush=True)
                folder.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps({"record": record, "complete": False}, indent=2) + "\n")
            summary = train(stage_data, stage_args, resume, argv)
            if PartialState().is_main_process:  # the stage is complete
                marker.write_text(json.dumps({"record": record, "complete": True}, indent=2) + "\n")
            PartialState().wait_for_everyone()
        done.append({"stage": record["stage"], "teacher": str(teacher), "output_dir": str(folder),
                     "parameters": summary["student"]["parameters"]["total"],
                     "teacher_name": summary["teacher"]["name"],
                     "teacher_parameters": summary["teacher"]["parameters"]["total"]})
        teacher = folder
    summary["chain"] = done
    if PartialState().is_main_process:
        Path(out, "training_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def read_chain_record(path: Path) -> dict:
    """A stage's ``chain_stage.json`` (``{}`` when missing or unreadable: the stage is not finished)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def train(data_args: DataArguments, args: CLIPDistillationConfig, resume: str | None, argv=None) -> dict:
    """Train one student from checked arguments (sections 2-6 below)."""
    # The recipe pushes once, after saving (section 6); Trainer never sees push_to_hub (see the module docstring).
    push_to_hub, args.push_to_hub = args.push_to_hub, False
    start = time.time()

    # 2. Data (its columns checked before any model is loaded) ------------------------------------------------------
    with config_errors(), args.main_process_first(desc="loading the training set"):
        train_dataset = load_train_dataset(data_args)
    with config_errors():  # the class-logit terms read the labels' class names
        names = class_names(train_dataset, data_args) if "student_classes" in args.needed_inputs() else None

    # 3. Teacher and student ----------------------------------------------------------------------------------------
    set_seed(args.seed)
    rows = (calibration_rows(train_dataset, args.calibration_samples)
            if args.student_width_importance == "activation" else None)
    with config_errors():  # a shape only the loaded teacher can check (a hub id) is one line too
        teacher, student, processor, init, counts = build_models(args, rows, data_args.image_column,
                                                                 data_args.text_column)
    teacher_params, student_params = counts["teacher"], counts["student"]
    use_sidecars = data_args.teacher_sidecar_dir is not None and args.needs_teacher
    use_cache = (data_args.teacher_cache_dir is not None and args.needs_teacher) or use_sidecars
    # the teacher's class embeddings, computed once (also when the cache replaces the teacher in training)
    classes = (teacher_class_targets(teacher.to(args.device), names, args.class_templates)
               if "teacher_classes" in args.needed_inputs() else None)
    if use_sidecars:
        spec = ViewSpec(views=data_args.teacher_views)  # a data artefact: not tied to the run's --seed
        with config_errors():  # a stale sidecar is one line naming its shard and what changed
            build_sidecars(data_args.data_dir, teacher.to(args.device), data_args.teacher_sidecar_dir, spec=spec,
                           batch_size=args.per_device_train_batch_size, accelerator=PartialState())
            train_dataset = stream_with_sidecars(data_args.data_dir, teacher, data_args.teacher_sidecar_dir,
                                                 spec=spec)
        if data_args.max_train_samples:
            train_dataset = train_dataset.take(data_args.max_train_samples)
    elif use_cache:
        with config_errors():  # a stale cache is one line naming what changed
            train_dataset = cache_teacher_embeddings(
                train_dataset,
                teacher.to(args.device),
                data_args.teacher_cache_dir,
                image_column=data_args.image_column,
                text_column=data_args.text_column,
                batch_size=args.per_device_train_batch_size,
                accelerator=PartialState(),
            )
    collator = CLIPDistillationCollator(
        processor,
        teacher.inputs() if args.needs_teacher else None,
        image_column=data_args.image_column,
        text_column=data_args.text_column,
        class_column=data_args.label_column if names else None,
    )

    # 4. Train ------------------------------------------------------------------------------------------------------
    with config_errors():  # the feature terms' layer pairs, checked against the loaded teacher
        trainer = CLIPDistillationTrainer(
            model=student,
            teacher=teacher if args.needs_teacher and not use_cache else None,
            args=args,
            train_dataset=train_dataset,
            data_collator=collator,
            processing_class=processor,
            class_names=names,
            teacher_classes=classes,
        )
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.save_state()  # trainer_state.json: the logged losses, for plots and the model card

    # 5. Summary ----------------------------------------------------------------------------------------------------
    summary = {
        "teacher": {"name": teacher.name, "backend": teacher.backend, "parameters": teacher_params},
        "student": {"parameters": student_params, "init": asdict(init)},
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": trainer.accelerator.distributed_type.value,  # NO, MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gathered_batch_size": trainer.gathered_batch_size,
        "teacher_embeddings": ("sidecars" if use_sidecars else "cached" if use_cache
                               else "live" if args.needs_teacher else "none"),
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "wall_time_s": round(time.time() - start, 1),
        "hardware": hardware_description(),
        "data": asdict(data_args),
        "data_description": describe_dataset(data_args),
        "losses": args.loss_card_rows(),  # the card's objective table, from the trainer's loss table
    }
    if trainer.is_world_process_zero():
        Path(args.output_dir, "training_summary.json").write_text(json.dumps(summary, indent=2))
        write_training_config(args, data_args)
        print(
            f"student saved to {args.output_dir}: {student_params['total']:,} parameters "
            f"({student_params['total'] / teacher_params['total']:.0%} of the teacher's {teacher_params['total']:,}), "
            f"{trainer.state.global_step} steps on {summary['world_size']} process(es) in {summary['wall_time_s']} s"
        )

    # 6. Push to the Hub (main process only) ------------------------------------------------------------------------
    if push_to_hub and trainer.is_world_process_zero():
        from mmkd.hub import push_trained

        command = command_line("recipes/clip_student.py", sys.argv[1:] if argv is None else argv)
        repo_id = args.hub_model_id or Path(args.output_dir).absolute().name  # Trainer's default
        summary["hub_commit_url"] = push_trained(args.output_dir, repo_id, args, command)
    return summary


if __name__ == "__main__":
    main()
    shutdown()  # under a multi-process launch: end the process group cleanly on every rank
