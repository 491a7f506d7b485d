"""Bad configuration, tried as a new user would: every bad value ends the recipe with exit status 2 and one line,
``error: <option>=<value>: <why>``, naming the option -- and no model is loaded first."""

from __future__ import annotations

import pytest

from mmkd import teachers
from mmkd.teachers import TeacherBackend
from tests.conftest import REPO, load_recipe

SMOKE = REPO / "recipes" / "configs" / "smoke.yaml"
MATCH = REPO / "recipes" / "configs" / "match_fashion_mnist.yaml"
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefXYZ"


def block_model_loading(monkeypatch) -> None:
    """Every way a model loads raises: a check that runs after loading a model fails."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad option was refused")

    for name, backend in list(teachers.BACKENDS.items()):
        monkeypatch.setitem(teachers.BACKENDS, name, TeacherBackend(claims=backend.claims, load=boom))
    import open_clip
    from transformers import CLIPModel

    from mmkd.students import ResNetMiniLMMatcher

    monkeypatch.setattr(open_clip, "create_model_and_transforms", boom)
    monkeypatch.setattr(CLIPModel, "from_pretrained", boom)
    monkeypatch.setattr(ResNetMiniLMMatcher, "from_components", boom)


@pytest.fixture
def no_model_loading(monkeypatch):
    block_model_loading(monkeypatch)


def clip_argv(tmp_path, *extra):
    return ["--config", str(SMOKE), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", *extra]


def yaml_with(tmp_path, text: str) -> list[str]:
    path = tmp_path / "bad.yaml"
    path.write_text(SMOKE.read_text() + text)
    return ["--config", str(path), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true"]


CLIP_CASES = [
    (["--triplet_weight", "-1"], "triplet_weight=-1.0: must be >= 0"),
    (["--student_init", "alternate"], "student_init='alternate'; choose one of every_other"),
    (["--triplet_negatives", "semi"], "triplet_negatives='semi': choose one of hardest, random"),
    (["--teacher_backend", "onnx"], "teacher_backend='onnx': choose one of auto"),
    (["--affinity_temperature", "0"], "affinity_temperature=0.0: must be > 0"),
    (["--student_vision_layers", "0"], "student_vision_layers=0: must be >= 1"),
    (["--student_text_layers", "9"], "student_text_layers=9: the teacher has 4 text layers"),
    (["--teacher_name_or_path", "/nonexistent/teacher"], "teacher_name_or_path=/nonexistent/teacher: no such file"),
    (["--teacher_name_or_path", "ViT-B-3"], "teacher_name_or_path=ViT-B-3: not an open_clip model name"),
    (["--teacher_name_or_path", "ViT-B-32", "--teacher_pretrained", "/missing/weights.pt"],
     "teacher_pretrained=/missing/weights.pt: no such file"),
    (["--teacher_name_or_path", "ViT-B-32", "--teacher_pretrained", "laion2b"],
     "teacher_pretrained=laion2b: not a pretrained tag of ViT-B-32"),
    (["--dataset_name", "fashion-mnist"], "dataset_name=fashion-mnist: unknown dataset; choose one of shapes"),
    (["--image_column", "img"], "image_column=img: dataset 'shapes' has no such column"),
    (["--text_column", "caption"], "text_column=caption: dataset 'shapes' has no such column"),
    (["--dataset_name", "fashion_mnist", "--data_dir", "/missing/idx"], "data_dir=/missing/idx: no such file"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0: must be an integer >= 1"),
    (["--per_device_train_batch_size", "eight"], "per_device_train_batch_size='eight': invalid int value"),
    (["--learning_rate", "-0.001"], "learning_rate=-0.001: must be >= 0"),
    (["--max_steps", "-5", "--num_train_epochs", "0"], "max_steps=-5: with num_train_epochs=0.0 the run would train 0"),
    (["--distill_loss", "l1"], "distill_loss='l1': choose one of mse_cosine, mse, cosine"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps=0: must be an integer >= 1"),
    (["--contrastive_weight", "nan"], "contrastive_weight=nan: must be >= 0"),
    (["--teacher_cache_dir", "cache", "--streaming", "true"], "teacher_cache_dir=cache: the cache needs a map-style"),
    (["--resume_from_checkpoint", "/missing/checkpoint-3"], "resume_from_checkpoint=/missing/checkpoint-3: "),
    (["--max_train_samples", "0"], "max_train_samples=0: must be an integer >= 1"),
    (["--student_vision_width", "96"], "student_vision_width=96: wider than the teacher's vision width 64"),
    (["--student_text_width", "48", "--student_text_heads", "5"], "student_text_heads=5: more than the teacher's 2"),
    (["--student_vision_width", "45", "--student_vision_heads", "2"],
     "student_vision_heads=2: student_vision_width=45 is not divisible by it"),
    (["--student_text_mlp_width", "512"], "student_text_mlp_width=512: wider than the teacher's text MLP width 256"),
    (["--student_vision_heads", "0"], "student_vision_heads=0: must be an integer >= 1"),
    (["--student_width_importance", "taylor"], "student_width_importance='taylor': choose one of magnitude"),
]


def assert_one_line(capsys, info, expected: str) -> str:
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and expected in err[0], err[0]
    return err[0]


@pytest.mark.parametrize(("extra", "expected"), CLIP_CASES, ids=[c[1].split(":")[0] for c in CLIP_CASES])
def test_clip_student_refuses_bad_values(tmp_path, capsys, no_model_loading, extra, expected):
    recipe = load_recipe("clip_student")
    with pytest.raises(SystemExit) as info:
        recipe.main(clip_argv(tmp_path, *extra))
    assert_one_line(capsys, info, expected)
    assert not (tmp_path / "out").exists()  # nothing written either


YAML_CASES = [
    ("per_device_train_batch_size: [8]\n", "per_device_train_batch_size=[8]: expected one value, not a list"),
    ("triplet_margn: 0.2\n", "unknown option(s) triplet_margn"),
    ("max_steps: 8.5\n", "max_steps='8.5': invalid int value"),
]


@pytest.mark.parametrize(("yaml", "expected"), YAML_CASES)
def test_yaml_values_go_through_the_same_checks(tmp_path, capsys, no_model_loading, yaml, expected):
    recipe = load_recipe("clip_student")
    with pytest.raises(SystemExit) as info:
        recipe.main(yaml_with(tmp_path, yaml))
    assert_one_line(capsys, info, expected)


def test_a_token_option_is_refused_without_echoing_it(tmp_path, capsys, no_model_loading):
    recipe = load_recipe("clip_student")
    with pytest.raises(SystemExit) as info:
        recipe.main(clip_argv(tmp_path, "--push_to_hub", "true", "--hub_token", FAKE_TOKEN))
    line = assert_one_line(capsys, info, "hub_token: pass the token through the HF_TOKEN environment variable")
    assert FAKE_TOKEN not in line


MATCH_CASES = [
    (["--stage", "teach"], "stage='teach': choose one of teacher, baseline"),
    (["--teacher_head", "bilinear"], "teacher_head='bilinear': choose one of cosine, mlp"),
    (["--alpha", "1.5"], "alpha=1.5: must be in [0, 1]"),
    (["--stage", "baseline", "--dataset_name", "cocoo"], "dataset_name=cocoo: unknown dataset; choose one of fashion_mnist, coco"),
    (["--stage", "baseline", "--dataset_name", "coco"], "data_dir=None: --dataset_name coco needs the COCO root"),
    (["--resnet", "resnet19"], "resnet='resnet19': choose one of resnet18"),
    (["--stage", "sweep", "--sweep_alphas", "0.5,x"], "sweep_alphas=0.5,x: a comma-separated list of numbers"),
    (["--stage", "teacher", "--push_to_hub", "true"], "push_to_hub=true: pushes a student"),
    (["--stage", "teacher", "--teacher_name_or_path", "/missing/clip"], "teacher_name_or_path=/missing/clip: no such"),
]


@pytest.mark.parametrize(("extra", "expected"), MATCH_CASES, ids=[c[1].split(":")[0] for c in MATCH_CASES])
def test_match_student_refuses_bad_values(tmp_path, capsys, no_model_loading, extra, expected):
    recipe = load_recipe("match_student")
    with pytest.raises(SystemExit) as info:
        recipe.main(match_argv(tmp_path, *extra))
    assert_one_line(capsys, info, expected)


OFFLINE_CASES = [
    (["--max_steps", "0"], "max_steps=0: must be an integer >= 1"),
    (["--teacher_config", "missing.yaml"], "teacher_config=missing.yaml: no such file"),
    (["--architecture", "ViT-B-3"], "architecture=ViT-B-3: not an open_clip model name"),
    (["--train_overrides", "--learning_rate -1"], "learning_rate=-1.0: must be >= 0"),
]


def match_argv(tmp_path, *extra):
    return ["--config", str(MATCH), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true", *extra]


def offline_argv(tmp_path, *extra):
    return ["--config", str(REPO / "recipes/configs/offline_job.yaml"), "--output_dir", str(tmp_path / "job"), *extra]


@pytest.mark.parametrize(("extra", "expected"), OFFLINE_CASES)
def test_offline_job_checks_every_stage_before_training(tmp_path, capsys, no_model_loading, extra, expected):
    job = load_recipe("offline_job")
    with pytest.raises(SystemExit) as info:
        job.main(offline_argv(tmp_path, *extra))
    assert_one_line(capsys, info, expected)
    assert not (tmp_path / "job").exists()


def test_valid_yaml_values_are_accepted(tmp_path):
    """A list where the field takes one (report_to), a value starting with '-': accepted as TrainingArguments does."""
    recipe = load_recipe("clip_student")
    _, args = recipe.parse_args(yaml_with(tmp_path, "report_to: [tensorboard]\nrun_name: -odd-name\n"))
    assert args.report_to == ["tensorboard"] and args.run_name == "-odd-name"


def test_pretrained_tags_are_normalised_as_open_clip_does():
    from mmkd.teachers import check_teacher_spec

    for tag in ("laion2b_s34b_b79k", "laion2b-s34b-b79k", "OpenAI"):
        check_teacher_spec("ViT-B-32", tag, "auto")  # open_clip loads these; the check must not refuse them
