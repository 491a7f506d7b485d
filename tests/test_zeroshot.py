"""Zero-shot classification: the metric maths, the classifier, parity with CLIP_benchmark, every model kind,
the CLI, and a real 2-process run."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from mmkd import cli
from mmkd.data.preprocessing import Preprocessing
from mmkd.data.shapes import COLORS, draw_shape
from mmkd.eval.encoders import CLIPEncoder
from mmkd.eval.zeroshot import (
    default_classnames,
    default_templates,
    evaluate_zeroshot,
    zero_shot_classifier,
    zeroshot_metrics,
)


def main(argv: list[str]) -> int:
    """``mmkd zeroshot ...`` in-process: the command's exit status."""
    return cli.main(["zeroshot", *argv])


REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TWO_TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}."]
COLOR_NAMES = list(COLORS)  # 6 classes


# -- a fake encoder whose embeddings are chosen by the test --------------------------------------------------
class ListDataset(torch.utils.data.Dataset):
    """(PIL image, label) pairs with class names, the interface evaluate_zeroshot reads."""

    def __init__(self, items, classnames, name="fake-set"):
        self.items, self.classnames, self.name = items, classnames, name

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def fake_encoder(image_table: torch.Tensor, text_table: dict[str, torch.Tensor]) -> CLIPEncoder:
    """Image ``i`` is a 1x1 picture whose red value is ``i``; it embeds as ``image_table[i]``; a prompt embeds
    as ``text_table[prompt]`` (both normalised by CLIPEncoder, as a real model's are)."""
    prompts = list(text_table)
    text_matrix = torch.stack([text_table[p] for p in prompts])  # (P, E)
    calls = {"text_batches": 0}

    def preprocess(images):
        ids = torch.tensor([float(img.getpixel((0, 0))[0]) for img in images])  # (B,)
        return ids.view(-1, 1, 1, 1)  # (B, 1, 1, 1)

    def tokenize(texts):
        return {"input_ids": torch.tensor([prompts.index(t) for t in texts])}  # (B,)

    def text_fn(tokens):
        calls["text_batches"] += 1
        return text_matrix[tokens["input_ids"]]  # (B, E)

    encoder = CLIPEncoder(
        nn.Linear(1, 1),
        Preprocessing(preprocess, tokenize, {}, "fake"),
        "fake",
        lambda px: image_table[px.view(-1).long()],  # (B, E)
        text_fn,
    )
    encoder.calls = calls
    return encoder


def pixel(i: int) -> Image.Image:
    return Image.new("RGB", (1, 1), (i, 0, 0))


# (label, 1-based rank the model gives the true class): 6 classes, class 4 without images, imbalanced.
RANKED = [(0, 1)] * 4 + [(0, 3), (0, 6), (1, 2), (1, 6), (2, 1), (3, 5), (5, 1), (5, 2)]


def ranked_set(ranked=RANKED, num_classes=6):
    """Images whose scores put their true class at a chosen rank; text embeddings are one-hot per class."""
    image_rows = []
    for i, (label, rank) in enumerate(ranked):
        others = [c for c in range(num_classes) if c != label]
        others = others[i % len(others) :] + others[: i % len(others)]  # vary the wrong classes' order
        order = others[: rank - 1] + [label] + others[rank - 1 :]  # best first
        scores = torch.zeros(num_classes)
        scores[order] = torch.arange(num_classes, 0, -1, dtype=torch.float)  # distinct, positive
        image_rows.append(scores)
    classnames = [f"c{j}" for j in range(num_classes)]
    text_table = {
        t.format(c=c): torch.eye(num_classes)[j] for j, c in enumerate(classnames) for t in TWO_TEMPLATES
    }
    encoder = fake_encoder(torch.stack(image_rows), text_table)
    dataset = ListDataset([(pixel(i), label) for i, (label, _) in enumerate(ranked)], classnames)
    return encoder, dataset


# -- metric maths --------------------------------------------------------------------------------------------
def test_metrics_known_answer():
    encoder, dataset = ranked_set()
    r = evaluate_zeroshot(encoder, dataset, templates=TWO_TEMPLATES, batch_size=5, progress=False)
    # top-1 hits: 4 (class 0) + 1 (class 2) + 1 (class 5) of 12; top-5 misses: the two rank-6 images.
    assert r["acc1"] == 6 / 12
    assert r["acc5"] == 10 / 12
    assert r["per_class_accuracy"] == {"c0": 4 / 6, "c1": 0.0, "c2": 1.0, "c3": 0.0, "c4": None, "c5": 0.5}
    # the mean over the 5 classes that have images, not over 6, and not acc1 (the set is imbalanced)
    assert r["mean_per_class_recall"] == pytest.approx((4 / 6 + 0 + 1 + 0 + 0.5) / 5, abs=1e-12)
    assert r["mean_per_class_recall"] != pytest.approx(r["acc1"])
    assert (r["num_images"], r["num_classes"], r["dataset"], r["model"]) == (12, 6, "fake-set", "fake")


def test_metrics_match_sklearn_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 7, (50,), generator=g)
    topk = torch.stack([torch.randperm(7, generator=g)[:5] for _ in range(50)])  # (50, 5)
    m = zeroshot_metrics(topk, targets, 7)
    assert m["mean_per_class_recall"] == balanced_accuracy_score(targets.numpy(), topk[:, 0].numpy())
    assert m["acc1"] == (topk[:, 0] == targets).sum().item() / 50


def test_acc5_only_with_five_classes():
    encoder, dataset = ranked_set([(0, 1), (1, 2), (2, 1), (3, 4), (1, 1)], num_classes=4)
    r = evaluate_zeroshot(encoder, dataset, templates=TWO_TEMPLATES, progress=False)
    assert "acc5" not in r
    assert r["acc1"] == 3 / 5
    assert r["per_class_accuracy"] == {"c0": 1.0, "c1": 0.5, "c2": 1.0, "c3": 0.0}


def test_bad_input_is_rejected_before_encoding():
    encoder, dataset = ranked_set()
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_zeroshot(encoder, dataset, batch_size=0)
    with pytest.raises(ValueError, match=r"\{c\}"):
        evaluate_zeroshot(encoder, dataset, templates=["a photo"])
    with pytest.raises(ValueError, match="7 classes"):
        evaluate_zeroshot(encoder, dataset, classifier=torch.zeros(6, 7))
    with pytest.raises(ValueError, match="no .classnames"):
        evaluate_zeroshot(encoder, [(pixel(0), 0)])
    assert encoder.calls["text_batches"] == 0  # all refused before any text was encoded
    bad = ListDataset([(pixel(0), 9)], [f"c{j}" for j in range(6)])
    with pytest.raises(ValueError, match="label 9"):
        evaluate_zeroshot(encoder, bad, templates=TWO_TEMPLATES, progress=False)


def test_warns_when_launched_processes_are_not_seen(monkeypatch):
    """torchrun on CPUs without ACCELERATE_USE_CPU=1: accelerate sees one process; say so instead of silently
    evaluating everything in every process."""
    encoder, dataset = ranked_set()
    single = SimpleNamespace(
        process_index=0, num_processes=1, is_main_process=True, device=torch.device("cpu")
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match="ACCELERATE_USE_CPU=1"):
        r = evaluate_zeroshot(encoder, dataset, templates=TWO_TEMPLATES, accelerator=single, progress=False)
    assert r["num_images"] == 12


def test_gather_keeps_one_row_per_image(monkeypatch):
    """The de-duplication after the gather, with a fake 2-process gather: padding dropped, duplicates once."""
    import accelerate.utils

    from mmkd.eval.zeroshot import _gather_rows

    state = SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    mine = torch.tensor([[0, 1, 1], [2, 0, 0], [4, 1, 0]])  # [index, label, top-1] rows of this process
    theirs = torch.tensor([[3, 0, 1], [1, 1, 1], [4, 1, 0]])  # image 4 a second time
    monkeypatch.setattr(accelerate.utils, "gather", lambda t: torch.cat([t, theirs]))
    rows = _gather_rows(mine, 5, state)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4] and rows[4].tolist() == [4, 1, 0]
    monkeypatch.setattr(accelerate.utils, "gather", lambda t: torch.cat([t, torch.full_like(t, -1)]))
    with pytest.raises(RuntimeError, match="3 of 5 images"):
        _gather_rows(mine, 5, state)


# -- the classifier ------------------------------------------------------------------------------------------
def test_classifier_is_normalised_mean_of_normalised_prompts():
    g = torch.Generator().manual_seed(0)
    classnames = ["cat", "dog", "bird"]
    text_table = {t.format(c=c): torch.randn(8, generator=g) * 3 for c in classnames for t in TWO_TEMPLATES}
    encoder = fake_encoder(torch.randn(4, 8, generator=g), text_table)
    calls = []
    encode_texts = encoder.encode_texts
    encoder.encode_texts = lambda texts, batch_size=256: (
        calls.append(list(texts)) or encode_texts(texts, batch_size)
    )

    clf = zero_shot_classifier(encoder, classnames, TWO_TEMPLATES, batch_size=4)

    expected = []
    for c in classnames:
        units = [v / v.norm() for v in (text_table[t.format(c=c)] for t in TWO_TEMPLATES)]
        mean = (units[0] + units[1]) / 2
        expected.append(mean / mean.norm())
    torch.testing.assert_close(clf, torch.stack(expected, dim=1))  # (E, C)
    assert clf.shape == (8, 3)
    # one encode_texts call holding all 6 prompts once, encoded in ceil(6 / 4) = 2 batches
    assert calls == [[t.format(c=c) for c in classnames for t in TWO_TEMPLATES]]
    assert encoder.calls["text_batches"] == 2


def test_classifier_reused_across_evaluations():
    encoder, dataset = ranked_set()
    clf = zero_shot_classifier(encoder, dataset.classnames, TWO_TEMPLATES)
    assert encoder.calls["text_batches"] == 1
    first = evaluate_zeroshot(encoder, dataset, classifier=clf, progress=False)
    second = evaluate_zeroshot(encoder, dataset, classifier=clf, batch_size=3, progress=False)
    assert encoder.calls["text_batches"] == 1  # no text encoded again
    assert first == second
    assert first["acc1"] == 0.5


def test_shipped_classnames_and_templates():
    assert len(default_templates("cifar10")) == len(default_templates("cifar100")) == 18
    assert default_templates("stl10") == ["a photo of a {c}.", "a photo of the {c}."]
    assert len(default_templates("my-folder")) == 80  # CLIP_benchmark's fallback: the ImageNet prompts
    assert [len(default_classnames(n)) for n in ("cifar10", "cifar100", "stl10")] == [10, 100, 10]
    assert default_classnames("cifar100")[:2] == ["apple", "aquarium_fish"]  # torchvision's names, unchanged
    assert default_classnames("imagefolder") is None


def test_named_dataset_uses_clip_benchmark_names_and_templates(tmp_path):
    """``cifar10`` from a tiny generated official binary folder: CLIP_benchmark's 10 names x 18 templates."""
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = random.Random(0)
    records = b"".join(bytes([i % 10]) + bytes(rng.randrange(256) for _ in range(3072)) for i in range(7))
    (folder / "test_batch.bin").write_bytes(records)
    (folder / "batches.meta.txt").write_text("\n".join(default_classnames("cifar10")) + "\n")
    encoder = load_ddp_script().toy_encoder()
    prompts = []
    encode_texts = encoder.encode_texts
    encoder.encode_texts = lambda texts, batch_size=256: (
        prompts.extend(texts) or encode_texts(texts, batch_size)
    )

    r = evaluate_zeroshot(encoder, "cifar10", data_dir=str(tmp_path), progress=False)
    assert (r["dataset"], r["num_images"], r["num_classes"]) == ("cifar10", 7, 10)
    assert list(r["per_class_accuracy"]) == default_classnames("cifar10")
    expected = [t.format(c=c) for c in default_classnames("cifar10") for t in default_templates("cifar10")]
    assert prompts == expected and len(prompts) == 180


# -- parity with CLIP_benchmark ------------------------------------------------------------------------------
def color_items(n: int, seed: int) -> list[tuple[Image.Image, int]]:
    """Coloured shapes labelled by colour (6 classes), imbalanced: label drawn from a skewed distribution."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        label = min(int(rng.expovariate(0.5)), len(COLOR_NAMES) - 1)
        shape = rng.choice(["circle", "square", "triangle", "cross"])
        items.append((draw_shape(shape, COLORS[COLOR_NAMES[label]], 32, rng), label))
    return items


@pytest.fixture(scope="module")
def varied_open_clip_teacher():
    """The tiny open_clip ViT with larger random weights (std 0.1).

    Under open_clip's own init the tiny random model embeds every image almost alike, so all images get the
    same class and a prediction-by-prediction comparison would be vacuous; these weights vary the predictions.
    """
    import open_clip

    from mmkd.teachers import OpenCLIPTeacher

    open_clip.add_model_config(str(REPO / "recipes" / "configs" / "tiny_openclip_vit.json"))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny_openclip_vit")
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.1)
    return OpenCLIPTeacher(model, preprocess, open_clip.get_tokenizer("tiny_openclip_vit"), "tiny")


def test_parity_with_clip_benchmark(varied_open_clip_teacher):
    from clip_benchmark.metrics import zeroshot_classification as cb
    from sklearn.metrics import balanced_accuracy_score

    teacher = varied_open_clip_teacher
    items = color_items(24, seed=3)
    templates = default_templates("cifar10")

    class CBDataset(torch.utils.data.Dataset):  # CLIP_benchmark's interface: transformed tensors and .classes
        classes = COLOR_NAMES

        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return teacher.preprocess(items[i][0]), items[i][1]

    loader = torch.utils.data.DataLoader(CBDataset(), batch_size=5)
    cb_clf = cb.zero_shot_classifier(
        teacher.model, teacher.tokenizer, COLOR_NAMES, templates, "cpu", amp=False
    )
    logits, target = cb.run_classification(teacher.model, cb_clf, loader, "cpu", amp=False)
    # CLIP_benchmark's metric computation (``evaluate``): ``accuracy`` over top-k, sklearn's balanced accuracy
    # on the argmax. Its ``accuracy`` calls float() on a 1-element array, which the installed numpy (2.4)
    # refuses, so its formula is evaluated here with .item() instead.
    pred = logits.topk(5, 1, True, True)[1].t()  # (5, N)
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    cb_metrics = {
        "acc1": correct[:1].reshape(-1).float().sum(0).item() / len(target),
        "acc5": correct[:5].reshape(-1).float().sum(0).item() / len(target),
        "mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(axis=1)),
    }

    clf = zero_shot_classifier(teacher, COLOR_NAMES, templates, batch_size=50)
    torch.testing.assert_close(clf, cb_clf, rtol=1e-5, atol=1e-6)
    ours = evaluate_zeroshot(
        teacher,
        ListDataset(items, COLOR_NAMES),
        templates=templates,
        batch_size=7,
        progress=False,
        return_predictions=True,
    )
    assert ours["predictions"] == logits.argmax(dim=1).tolist()
    assert len(set(ours["predictions"])) > 2  # a non-degenerate comparison
    assert 4 not in target.tolist()  # a class without images: both average the recall over the other five
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours[key] == cb_metrics[key], key


# -- every kind of model -------------------------------------------------------------------------------------
def write_folder(root: Path, n: int, classes: list[str], seed: int = 0) -> Path:
    rng = random.Random(seed)
    for i in range(n):
        name = classes[i % len(classes)]
        (root / name).mkdir(parents=True, exist_ok=True)
        draw_shape("circle", COLORS[name], 32, rng).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder13(tmp_path_factory) -> Path:
    """13 images in 6 colour classes: not divisible by 2 x batch 4."""
    return write_folder(tmp_path_factory.mktemp("colors") / "colors", 13, COLOR_NAMES)


def test_model_kinds(tiny_hf_clip_dir, open_clip_teacher, folder13):
    from transformers import CLIPModel, CLIPProcessor

    kw = dict(templates=TWO_TEMPLATES, batch_size=4, progress=False, return_predictions=True)
    from_dir = evaluate_zeroshot(str(tiny_hf_clip_dir), str(folder13), **kw)
    assert from_dir["model"] == str(tiny_hf_clip_dir)
    assert from_dir["dataset"] == str(folder13)
    assert (from_dir["num_images"], from_dir["num_classes"]) == (13, 6)
    assert set(from_dir["per_class_accuracy"]) == set(COLOR_NAMES)

    live = CLIPModel.from_pretrained(tiny_hf_clip_dir).train()
    from_live = evaluate_zeroshot(
        live, str(folder13), processor=CLIPProcessor.from_pretrained(tiny_hf_clip_dir), **kw
    )
    assert live.training  # put back in the mode it was in
    assert {k: v for k, v in from_live.items() if k != "model"} == {
        k: v for k, v in from_dir.items() if k != "model"
    }

    from_teacher = evaluate_zeroshot(open_clip_teacher, str(folder13), **kw)
    from_spec = evaluate_zeroshot(str(REPO / "recipes/configs/tiny_openclip_vit.json"), str(folder13), **kw)
    for r in (from_teacher, from_spec):
        assert r["num_images"] == 13 and 0.0 <= r["acc1"] <= r["acc5"] <= 1.0


# -- the command line ----------------------------------------------------------------------------------------
def test_cli_table_and_json(tiny_hf_clip_dir, folder13, tmp_path, capsys):
    small = write_folder(tmp_path / "small", 5, ["red", "blue", "green"], seed=1)  # 3 classes: no acc@5
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps(TWO_TEMPLATES))
    out = tmp_path / "res" / "results.json"
    argv = ["--model", str(tiny_hf_clip_dir), "--dataset", f"{folder13},{small}", "--dataset", str(folder13)]
    argv += ["--batch-size", "4", "--templates", str(templates), "--output", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    results = payload["results"]
    assert payload["model"] == str(tiny_hf_clip_dir)
    assert [r["dataset"] for r in results] == [str(folder13), str(small), str(folder13)]
    assert [r["num_images"] for r in results] == [13, 5, 13]
    assert "acc5" not in results[1]
    lines = printed.splitlines()
    assert lines[0].split() == ["dataset", "acc@1", "acc@5", "mean", "per-class", "recall", "images"]
    row = lines[2].split()
    assert row == [
        str(folder13),
        f"{100 * results[0]['acc1']:.2f}",
        f"{100 * results[0]['acc5']:.2f}",
        f"{100 * results[0]['mean_per_class_recall']:.2f}",
        "13",
    ]
    assert lines[3].split()[2] == "-"


def test_cli_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--model",
        "--pretrained",
        "--dataset",
        "--data-dir",
        "--split",
        "--batch-size",
        "--num-workers",
        "--templates",
        "--output",
        "--no-progress",
        "--backend",
    ):
        assert option in text


def test_cli_bad_input_one_line_exit_2(tmp_path, capsys, folder13):
    # The datasets are checked before the model is loaded: a bad model is not even reached.
    assert main(["--model", str(tmp_path / "no-model"), "--dataset", "no_such_dataset", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_dataset" in err[0] and "Traceback" not in err[0]

    assert main(["--model", str(tmp_path / "no-model"), "--dataset", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]

    assert main(["--model", str(tmp_path / "no-model"), "--dataset", str(folder13)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-model" in err[0]

    assert main(["--model", "m", "--dataset", str(folder13), "--templates", str(tmp_path / "t.json")]) == 2
    assert "t.json" in capsys.readouterr().err


def test_cli_process_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "mmkd.eval.zeroshot", "--model", "x", "--dataset", "bogus_set"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "bogus_set" in err[0], proc.stderr


# -- a real 2-process run ------------------------------------------------------------------------------------
def load_ddp_script():
    """The worker script as a module, for its toy encoder (the single-process reference uses the same one)."""
    spec = importlib.util.spec_from_file_location(
        "zeroshot_ddp_script", REPO / "tests" / "zeroshot_ddp_script.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_count_every_image_once(folder13, tmp_path):
    """torchrun starts 2 gloo processes on 13 images with batch 4 (13 is not a multiple of 2 x 4)."""
    out = tmp_path / "ranks"
    out.mkdir()
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    cmd += [str(REPO / "tests" / "zeroshot_ddp_script.py"), "--data", str(folder13), "--out", str(out)]
    cmd += ["--batch-size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"]) for r in records] == [(0, 2), (1, 2)]
    assert all("MULTI_CPU" in r["distributed_type"] for r in records)
    indices = [r["indices"] for r in records]
    assert all(len(i) == len(set(i)) for i in indices)  # no image read twice by a process
    assert set(indices[0]).isdisjoint(indices[1]) and set(indices[0]) | set(indices[1]) == set(range(13))
    assert sorted(map(len, indices)) == [6, 7]

    from mmkd.eval.datasets import load_classification_dataset

    single = evaluate_zeroshot(  # the same model and dataset object as the workers, in this one process
        load_ddp_script().toy_encoder(),
        load_classification_dataset(str(folder13)),
        templates=["a photo of a {c}.", "a drawing of a {c}."],
        batch_size=4,
        progress=False,
        return_predictions=True,
    )
    assert single["num_images"] == 13 and len(set(single["predictions"])) > 1
    for r in records:  # every process returns the single-process result, from the same 13 predictions
        assert r["result"] == single
        assert r["result_default"] == single  # accelerator=None: the launch is found without being passed
