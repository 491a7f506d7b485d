"""recipes/accelerate_configs/: every shipped `accelerate launch --config_file` file is accepted by accelerate, names
a wrap unit the student really has, and (DeepSpeed) agrees with the recipe's Trainer arguments the way transformers
checks it."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, load_recipe

CONFIGS = REPO / "recipes" / "accelerate_configs"
SMOKE = REPO / "recipes" / "configs" / "smoke.yaml"
CC3M = REPO / "recipes" / "configs" / "vit_b32_cc3m.yaml"

EXPECTED = {
    "single_gpu.yaml": ("NO", 1, 1),
    "multi_gpu.yaml": ("MULTI_GPU", 1, 8),
    "multi_node.yaml": ("MULTI_GPU", 2, 16),
    "fsdp2_full_shard.yaml": ("FSDP", 1, 8),
    "fsdp2_shard_grad_op.yaml": ("FSDP", 1, 8),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 1, 8),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 1, 8),
}


def test_every_config_file_is_shipped_and_loads_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for name, (kind, machines, processes) in EXPECTED.items():
        config = load_config_from_file(str(CONFIGS / name))
        assert (str(config.distributed_type).split(".")[-1], config.num_machines, config.num_processes) == (
            kind, machines, processes), name
        assert f"--config_file recipes/accelerate_configs/{name}" in (CONFIGS / name).read_text(), name


def test_fsdp_configs_wrap_the_students_encoder_layers():
    from accelerate.commands.config.config_args import load_config_from_file

    recipe = load_recipe("clip_student")
    _, args = recipe.parse_args(["--config", str(SMOKE), "--output_dir", "/tmp/unused", "--use_cpu", "true"])
    _, student, *_ = recipe.build_models(args)
    layer_classes = {type(m).__name__ for m in student.modules()}
    reshard = {}
    for name in ("fsdp2_full_shard.yaml", "fsdp2_shard_grad_op.yaml"):
        fsdp = load_config_from_file(str(CONFIGS / name)).fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] in layer_classes
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the saved student is a whole CLIPModel
        reshard[name] = fsdp["fsdp_reshard_after_forward"]
    # FSDP2's two strategies: full shard frees each layer after its forward, shard-grad-op keeps it to the backward
    assert reshard == {"fsdp2_full_shard.yaml": True, "fsdp2_shard_grad_op.yaml": False}


def _deepspeed_config(name):
    from accelerate.commands.config.config_args import load_config_from_file

    ds = load_config_from_file(str(CONFIGS / name)).deepspeed_config
    assert ds["zero3_init_flag"] is False  # a teacher loaded beside the student must never be partitioned
    return REPO / ds["deepspeed_config_file"]


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs_agree_with_the_trainer_arguments(name, stage, tmp_path):
    """transformers' own validation (HfTrainerDeepSpeedConfig, as Trainer runs it): every "auto" filled from the
    recipe's arguments, no mismatch; and a hand-edited value that disagrees is caught."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is installed by `make test`")
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    recipe = load_recipe("clip_student")
    _, args = recipe.parse_args(["--config", str(CC3M), "--output_dir", str(tmp_path), "--use_cpu", "true",
                                 "--max_steps", "100"])
    _, smoke = recipe.parse_args(["--config", str(SMOKE), "--output_dir", str(tmp_path), "--use_cpu", "true"])
    _, student, *_ = recipe.build_models(smoke)
    path = _deepspeed_config(name)
    try:
        ds = HfTrainerDeepSpeedConfig(str(path))
        ds.trainer_config_process(args)
        ds.trainer_config_finalize(args, student, num_training_steps=args.max_steps)
        assert ds.get_value("zero_optimization.stage") == stage
        assert ds.get_value("train_micro_batch_size_per_gpu") == args.per_device_train_batch_size == 256
        assert ds.get_value("train_batch_size") is None  # DeepSpeed derives it: micro batch x accumulation x world
        assert ds.get_value("gradient_clipping") == args.max_grad_norm
        assert ds.get_value("bf16.enabled") is True and ds.dtype().__repr__() == "torch.bfloat16"
        assert not ds.get_value("optimizer") and not ds.get_value("scheduler")  # the Trainer's own are used
        if stage == 3:
            assert ds.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save") is True

        edited = json.loads(path.read_text())
        edited["train_micro_batch_size_per_gpu"] = 3
        bad = HfTrainerDeepSpeedConfig(edited)
        bad.trainer_config_process(args)
        with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=3 vs hf per_device_train_batch_size"):
            bad.trainer_config_finalize(args, student, num_training_steps=args.max_steps)
    finally:
        unset_hf_deepspeed_config()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "ACCELERATE_USE_CPU": "1"}


def _accelerate():
    import os
    import sys

    return os.path.join(os.path.dirname(sys.executable), "accelerate")


def _recipe_argv(out, steps):
    return ["recipes/clip_student.py", "--config", str(SMOKE), "--output_dir", str(out), "--max_steps", str(steps),
            "--num_generated_examples", "128", "--save_strategy", "no", "--report_to", "none",
            "--logging_steps", "1", "--warmup_steps", "2"]


def _run(cmds, timeout=900):
    """Start every command at once (the nodes of one job) and wait for all of them."""
    import subprocess

    procs = [subprocess.Popen(c, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-6000:]
    return outputs


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _losses(folder):
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [row["loss"] for row in history if "loss" in row]


@pytest.mark.slow
def test_two_loopback_nodes_train_the_same_student_as_one_node_with_two_processes(tmp_path):
    """Multi-node DDP for real: two `accelerate launch` invocations (--num_machines 2, --machine_rank 0/1, the main
    node at 127.0.0.1), one process each, against one node running two processes; same final weights."""
    common = ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    _run([[_accelerate(), "launch", *common, "--num_machines", "1", "--main_process_port", str(_free_port()),
           *_recipe_argv(one_node, 6)]])
    port = _free_port()
    _run([[_accelerate(), "launch", *common, "--num_machines", "2", "--machine_rank", str(rank),
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--rdzv_backend", "static",
           *_recipe_argv(two_nodes, 6)] for rank in (0, 1)])
    summary = json.loads((two_nodes / "training_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 6
    a, b = _weights(one_node), _weights(two_nodes)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    # the same loss at every step, and the steps really trained (the comparison is not of two untouched inits)
    la, lb = _losses(one_node), _losses(two_nodes)
    assert len(la) == len(lb) == 6 and la[-1] < la[0]
    assert la == pytest.approx(lb, abs=1e-6)


@pytest.mark.slow
def test_fsdp2_over_gloo_follows_ddp_and_saves_a_stock_clip_model(tmp_path):
    """The shipped FSDP2 configs, run for real on 2 CPU processes over gloo (torch's fully_shard runs on CPU;
    accelerate's GPU-only gate on FSDP is lifted by tests/fsdp_cpu_launch.py): the loss curve of 10 steps matches
    DDP's to 1e-4, and the saved student loads as a stock CLIPModel with DDP's weights."""
    from transformers import CLIPModel

    cpu = ["--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]
    ddp = tmp_path / "ddp"
    _run([[_accelerate(), "launch", "--multi_gpu", *cpu, "--main_process_port", str(_free_port()),
           *_recipe_argv(ddp, 10)]])
    reference, reference_weights = _losses(ddp), _weights(ddp)
    assert len(reference) == 10 and reference[-1] < reference[0]
    for name in ("fsdp2_full_shard.yaml", "fsdp2_shard_grad_op.yaml"):
        out = tmp_path / name.removesuffix(".yaml")
        _run([[_accelerate(), "launch", "--config_file", str(CONFIGS / name), *cpu,
               "--main_process_port", str(_free_port()), "tests/fsdp_cpu_launch.py", *_recipe_argv(out, 10),
               "--save_strategy", "steps", "--save_steps", "5"]])
        assert json.loads((out / "training_summary.json").read_text())["distributed_type"] == "FSDP", name
        assert _losses(out) == pytest.approx(reference, abs=1e-4), name
        weights = _weights(out)
        assert weights.keys() == reference_weights.keys()
        assert max((weights[k] - reference_weights[k]).abs().max().item() for k in weights) < 1e-4, name
        student = CLIPModel.from_pretrained(str(out))
        assert type(student) is CLIPModel and student.config.vision_config.num_hidden_layers == 2
    # Resume under FSDP2: from the full-shard run's step-5 checkpoint (FSDP's own model and optimizer files) to the
    # same weights as the uninterrupted run.
    full, resumed = tmp_path / "fsdp2_full_shard", tmp_path / "resumed"
    assert (full / "checkpoint-5" / "pytorch_model_fsdp.bin").is_file()
    _run([[_accelerate(), "launch", "--config_file", str(CONFIGS / "fsdp2_full_shard.yaml"), *cpu,
           "--main_process_port", str(_free_port()), "tests/fsdp_cpu_launch.py", *_recipe_argv(resumed, 10),
           "--resume_from_checkpoint", str(full / "checkpoint-5")]])
    a, b = _weights(full), _weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def _deepspeed_worker(rank, port, prepared, out):
    import os

    import deepspeed
    import torch
    from transformers import CLIPModel

    from mmkd.distributed import prepare_for_sharding
    from tests.conftest import tiny_clip_config

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(layers=2))
    if prepared:
        prepare_for_sharding(model)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer":
              True, "zero_optimization": {"stage": 2}, "steps_per_print": 10**6}
    try:
        deepspeed.init_distributed(dist_backend="gloo")
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                          config=config)
        torch.manual_seed(rank)
        batch = {"input_ids": torch.randint(0, 99, (2, 5)), "pixel_values": torch.randn(2, 3, 32, 32),
                 "return_loss": True}
        engine.backward(engine(**batch).loss)
        engine.step()
        result = {"logit_scale": engine.module.logit_scale.detach().reshape(-1).tolist()}
    except Exception as error:  # noqa: BLE001 -- reported to the test
        result = {"error": f"{type(error).__name__}: {error}"}
    (out / f"{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_deepspeed_zero2_takes_a_prepared_clip_model(tmp_path):
    """Without a GPU no ZeRO run goes through accelerate here (accelerate gives a DeepSpeed job on CPU a one-process
    state), but DeepSpeed's own CPU accelerator runs over gloo: a stock CLIPModel crashes DeepSpeed's engine on its
    0-d logit_scale, the model prepare_for_sharding returns trains a ZeRO-2 step, in step on both ranks."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is installed by `make test`")
    import torch.multiprocessing as mp

    for prepared in (False, True):
        out = tmp_path / str(prepared)
        out.mkdir()
        mp.spawn(_deepspeed_worker, args=(_free_port(), prepared, out), nprocs=2, join=True)
        results = [json.loads((out / f"{r}.json").read_text()) for r in (0, 1)]
        if not prepared:
            assert all("cannot be 0" in r.get("error", "") for r in results), results
        else:
            assert all("error" not in r for r in results), results
            assert results[0]["logit_scale"] == results[1]["logit_scale"]
            assert results[0]["logit_scale"] != [2.6592600345611572]  # log(1/0.07): the step moved it
