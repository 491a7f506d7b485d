"""Gender-profession bias: the maths on hand-made embeddings, the comparison, the plot, the word lists, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmkd import cli
from mmkd.eval.bias import BiasReport, compare_bias, gender_profession_bias, weat_effect_size, weat_p_value
from mmkd.eval.bias_words import DEFAULT_PROFESSIONS, build_prompts, load_word_lists
from mmkd.reporting.plots import bias_plot
from tests.conftest import REPO, TINY_OPEN_CLIP_CONFIG


def main(argv: list[str]) -> int:
    """``mmkd bias ...`` in-process: the command's exit status."""
    return cli.main(["bias", *argv])


class FakeEncoder:
    """Returns a fixed hand-made unit vector per prompt, like CLIPEncoder.encode_texts (float64: exact ties)."""

    name = "fake"

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors
        self.seen: list[str] = []

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        self.seen.extend(texts)
        return torch.tensor(np.stack([self.vectors[t] for t in texts]), dtype=torch.float64)


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float64)
    return v / np.linalg.norm(v)


def profession_vector(s: float) -> np.ndarray:
    """A unit vector whose association with male term e1 / female term e2 is exactly ``s``: (u, u - s, rest)."""
    u = 0.3 + max(s, 0.0)
    v = u - s
    return np.array([u, v, math.sqrt(1 - u * u - v * v)])


E1, E2 = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
ONE_TEMPLATE = ["{}"]


def encoder_for(scores: dict[str, float]) -> FakeEncoder:
    vectors = {p: profession_vector(s) for p, s in scores.items()}
    vectors.update({"man": E1, "woman": E2})
    return FakeEncoder(vectors)


def bias_of(scores: dict[str, float], stereotypes: dict[str, str | None], **kw) -> BiasReport:
    return gender_profession_bias(
        encoder_for(scores), stereotypes, ["man"], ["woman"], ONE_TEMPLATE, **{"permutations": 10000, **kw}
    )


# Six professions with known association s = cos(p, man) - cos(p, woman).
SCORES = {"pilot": 0.5, "smith": 0.4, "miner": 0.3, "nanny": -0.1, "maid": 0.0, "typist": -0.2}
SPLIT = {
    "pilot": "male",
    "smith": "male",
    "miner": "male",
    "nanny": "female",
    "maid": "female",
    "typist": "female",
}


def test_scores_similarities_and_rankings_match_hand_computation():
    # Two male terms near e1 and two female terms near e2; every number below is worked out by hand.
    man, boy = E1, unit(1, 0, 0.2)
    woman, girl = E2, unit(0, 1, 0.2)
    nurse, builder, clerk = unit(0.2, 0.9, 0.3), unit(0.9, 0.1, 0.4), unit(0.5, 0.5, 0.7)
    enc = FakeEncoder(
        {
            "man": man,
            "boy": boy,
            "woman": woman,
            "girl": girl,
            "nurse": nurse,
            "builder": builder,
            "clerk": clerk,
        }
    )
    report = gender_profession_bias(
        enc, ["nurse", "builder", "clerk"], ["man", "boy"], ["woman", "girl"], ONE_TEMPLATE, top_k=2
    )
    for name, p in (("nurse", nurse), ("builder", builder), ("clerk", clerk)):
        cos_m = (sum(p[i] * man[i] for i in range(3)) + sum(p[i] * boy[i] for i in range(3))) / 2
        cos_f = (sum(p[i] * woman[i] for i in range(3)) + sum(p[i] * girl[i] for i in range(3))) / 2
        assert report.male_similarity[name] == pytest.approx(cos_m, abs=1e-6)
        assert report.female_similarity[name] == pytest.approx(cos_f, abs=1e-6)
        assert report.association[name] == pytest.approx(cos_m - cos_f, abs=1e-6)
    assert report.association["builder"] > 0 > report.association["nurse"]  # positive = male-associated
    assert [p for p, _ in report.most_male] == ["builder", "clerk"]
    assert [p for p, _ in report.most_female] == ["nurse", "clerk"]
    assert report.most_male[0][1] == pytest.approx(report.association["builder"])
    assert report.effect_size is None and report.p_value is None  # no stereotype split given
    assert enc.seen == ["nurse", "builder", "clerk", "man", "boy", "woman", "girl"]


def test_constructed_vectors_give_the_intended_scores():
    report = bias_of(SCORES, SPLIT)
    for p, s in SCORES.items():
        assert report.association[p] == pytest.approx(s, abs=1e-6)
    assert [p for p, _ in report.most_male[:3]] == ["pilot", "smith", "miner"]
    assert [p for p, _ in report.most_female[:3]] == ["typist", "nanny", "maid"]


def test_weat_effect_size_by_hand():
    report = bias_of(SCORES, SPLIT)
    # X = {0.5, 0.4, 0.3}, Y = {-0.1, 0.0, -0.2}: means 0.4 and -0.1; pooled mean 0.15,
    # squared deviations .1225 + .0625 + .0225 + .0625 + .0225 + .1225 = 0.415, sample variance 0.415 / 5.
    expected = (0.4 - (-0.1)) / math.sqrt(0.415 / 5)
    assert report.effect_size == pytest.approx(expected, abs=1e-6)
    assert weat_effect_size([0.5, 0.4, 0.3], [-0.1, 0.0, -0.2]) == pytest.approx(expected, rel=1e-12)
    assert weat_effect_size([0.2], []) is None
    assert weat_effect_size([0.2, 0.2], [0.2]) is None  # zero spread: undefined


def test_weat_p_value_exact_separated_set_is_one_in_twenty():
    report = bias_of(SCORES, SPLIT)
    # C(6, 3) = 20 partitions <= 10000: enumerated; only the observed one puts all three high scores in X.
    assert report.p_value_exact is True and report.partitions == 20
    assert report.p_value == pytest.approx(1 / 20)
    # reversed roles: every partition is >= the observed one
    flipped = {p: ("female" if s == "male" else "male") for p, s in SPLIT.items()}
    assert bias_of(SCORES, flipped).p_value == pytest.approx(1.0)


def test_weat_p_value_exact_count_by_hand():
    # values a=.5 b=.3 c=.2 d=.1 e=0 f=-.1, X = {a, d, e} (sum 0.6). 3-subsets with sum >= 0.6:
    # abc abd abe abf acd ace acf(=0.6) ade(observed) bcd(=0.6) -> 9 of 20 (ties count).
    p, exact, partitions = weat_p_value([0.5, 0.1, 0.0], [0.3, 0.2, -0.1], permutations=10000)
    assert (p, exact, partitions) == (pytest.approx(9 / 20), True, 20)
    # the same through the embeddings
    scores = {"a": 0.5, "d": 0.1, "e": 0.0, "b": 0.3, "c": 0.2, "f": -0.1}
    split = {"a": "male", "d": "male", "e": "male", "b": "female", "c": "female", "f": "female"}
    assert bias_of(scores, split).p_value == pytest.approx(9 / 20)


def test_weat_p_value_random_partitions():
    s_x, s_y = [0.5, 0.4, 0.3], [-0.1, 0.0, -0.2]
    p, exact, partitions = weat_p_value(s_x, s_y, permutations=10, seed=3)
    assert exact is False and partitions == 11
    assert p == weat_p_value(s_x, s_y, permutations=10, seed=3)[0]  # seeded
    # (hits + 1) / (10 + 1): a multiple of 1/11, never below it (the observed partition counts)
    assert 1 / 11 <= p <= 1 and p * 11 == pytest.approx(round(p * 11), abs=1e-9)
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.3, 1, 8), rng.normal(0, 1, 8)
    p_exact, exact, n = weat_p_value(x, y, permutations=20000)  # C(16, 8) = 12870
    assert exact and n == 12870
    p_random, exact, _ = weat_p_value(x, y, permutations=4000, seed=1)
    assert not exact and abs(p_random - p_exact) < 0.03
    with pytest.raises(ValueError, match="permutations"):
        weat_p_value(x, y, permutations=0)


@pytest.mark.parametrize(
    ("nx", "ny", "permutations", "seed"), [(3, 3, 10000, 0), (4, 3, 35, 0), (8, 8, 500, 7), (20, 20, 300, 1)]
)
def test_weat_p_value_is_scipys_permutation_test(nx, ny, permutations, seed):
    from scipy import stats

    rng = np.random.default_rng(nx * 100 + ny)
    x, y = rng.normal(0.2, 1, nx), rng.normal(0, 1, ny)
    p, exact, partitions = weat_p_value(x, y, permutations=permutations, seed=seed)
    expected = stats.permutation_test(
        (x, y),
        lambda a, b, axis: a.mean(axis=axis) - b.mean(axis=axis),
        permutation_type="independent",
        vectorized=True,
        n_resamples=permutations,
        alternative="greater",
        rng=np.random.default_rng(seed),
    )
    assert p == expected.pvalue
    n = math.comb(nx + ny, nx)
    assert exact is (n <= permutations)  # C(4+3, 4) = 35 <= 35 is still enumerated
    assert partitions == (n if exact else permutations + 1)
    assert len(expected.null_distribution) == (n if exact else permutations)


def test_weat_p_value_with_a_set_of_one_score():
    # scipy needs two values per set; one value: the n partitions are which value forms the set.
    # X = {0.3} among {0.5, 0.3, 0.1, 0.0}: t_i rises with the chosen value, 0.5 and 0.3 reach t -> 2 of 4
    assert weat_p_value([0.3], [0.5, 0.1, 0.0]) == (pytest.approx(2 / 4), True, 4)
    # Y = {0.1}: t = mean X - 0.1 is reached when Y is 0.1 or 0.0 -> 2 of 4
    assert weat_p_value([0.5, 0.3, 0.0], [0.1]) == (pytest.approx(2 / 4), True, 4)
    p, exact, partitions = weat_p_value([0.5], [0.3, 0.1, 0.0, -0.1, -0.2], permutations=3, seed=0)
    assert exact is False and partitions == 4
    assert 1 / 4 <= p <= 1 and p * 4 == pytest.approx(round(p * 4), abs=1e-9)
    rng = np.random.default_rng(0)
    x, y = rng.normal(1, 1, 1), rng.normal(0, 1, 6000)  # 6001 partitions
    p_exact, exact, _ = weat_p_value(x, y)
    p_random, random_exact, _ = weat_p_value(x, y, permutations=4000, seed=2)
    assert exact and not random_exact and abs(p_random - p_exact) < 0.03  # ~4 standard errors


def test_compare_identical_reports():
    report = bias_of(SCORES, SPLIT, top_k=2)
    cmp = compare_bias(report, report)
    assert cmp["spearman_rho"] == pytest.approx(1.0)
    assert cmp["flipped"] == []
    assert cmp["effect_size_change"] == pytest.approx(0.0)
    assert cmp["mean_abs_change"] == 0.0
    assert cmp["most_male_overlap"]["common"] == ["pilot", "smith"]
    assert cmp["most_female_overlap"]["fraction"] == 1.0
    json.dumps(cmp)  # JSON-ready


def test_compare_lists_exactly_the_flipped_professions():
    teacher = bias_of(SCORES, SPLIT, top_k=2)
    student_scores = {**SCORES, "miner": -0.05, "nanny": 0.2}  # two professions change direction
    student = bias_of(student_scores, SPLIT, top_k=2)
    cmp = compare_bias(teacher, student)
    assert [f["profession"] for f in cmp["flipped"]] == ["miner", "nanny"]
    assert cmp["flipped"][0]["teacher"] == pytest.approx(0.3) and cmp["flipped"][0][
        "student"
    ] == pytest.approx(-0.05)
    assert cmp["spearman_rho"] < 1
    assert cmp["effect_size_change"] == pytest.approx(student.effect_size - teacher.effect_size)
    assert cmp["most_male_overlap"]["student"] == ["pilot", "smith"]
    assert cmp["most_female_overlap"]["student"] == ["typist", "miner"]
    assert cmp["most_female_overlap"]["common"] == ["typist"]
    # dict form (JSON round trip) works the same
    again = compare_bias(json.loads(json.dumps(teacher.to_dict())), student.to_dict())
    assert again["flipped"] == cmp["flipped"]


def test_report_round_trip_and_json_keys():
    report = bias_of(SCORES, SPLIT, top_k=3)
    data = json.loads(json.dumps(report.to_dict()))
    assert {
        "model",
        "sign_convention",
        "templates",
        "male_terms",
        "female_terms",
        "professions",
        "most_male",
        "most_female",
        "weat",
    } <= set(data)
    assert data["weat"]["std_ddof"] == 1 and data["weat"]["partitions"] == 20
    assert BiasReport.from_dict(data) == report
    with pytest.raises(ValueError, match="not a BiasReport"):
        BiasReport.from_dict({"model": "x"})


def test_plot_single_and_comparison(tmp_path):
    from PIL import Image

    teacher = bias_of(SCORES, SPLIT)
    student = bias_of({**SCORES, "miner": -0.05, "nanny": 0.2}, SPLIT)
    for name, kw in (("single.png", {}), ("compare.png", {"compare_to": student})):
        out = bias_plot(teacher, path=tmp_path / "plots" / name, **kw)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out) as img:
            img.verify()
        with Image.open(out) as img:
            w, h = img.size
        assert 500 <= w <= 2500 and 400 <= h <= 3000


def test_default_word_lists_and_templates():
    lists = load_word_lists()
    assert len(lists.professions) == 40
    assert lists.stereotypes.count("male") == 20 and lists.stereotypes.count("female") == 20
    assert len(lists.male_terms) == len(lists.female_terms) == 12
    assert "man" in lists.male_terms and "woman" in lists.female_terms
    assert len(lists.templates) == 4
    assert build_prompts("accountant", ["a photo of {a} {}."]) == ["a photo of an accountant."]
    assert build_prompts("nurse", ["a photo of {a} {}.", "{}"]) == ["a photo of a nurse.", "nurse"]


def test_word_list_and_template_overrides_from_files(tmp_path):
    (tmp_path / "prof.txt").write_text("# my list\n\nwelder, male\nmidwife, FEMALE\nartist\n")
    (tmp_path / "m.txt").write_text("# male\nman\n")
    (tmp_path / "f.txt").write_text("# female\nwoman\n")
    (tmp_path / "t.txt").write_text("# templates\n{}\na photo of {a} {}.\n")
    welder, welder_photo = unit(0.8, 0.2, 0.5), unit(0.6, 0.1, 0.9)
    vectors = {"man": E1, "a photo of a man.": unit(1, 0, 0.1), "woman": E2, "a photo of a woman.": E2}
    vectors |= {"welder": welder, "a photo of a welder.": welder_photo}
    other = unit(0.3, 0.6, 0.2)  # "an artist": the {a} placeholder picks the article
    vectors |= {
        "midwife": other,
        "a photo of a midwife.": other,
        "artist": other,
        "a photo of an artist.": other,
    }
    report = gender_profession_bias(
        FakeEncoder(vectors),
        tmp_path / "prof.txt",
        str(tmp_path / "m.txt"),
        tmp_path / "f.txt",
        str(tmp_path / "t.txt"),
    )
    assert report.professions == ["welder", "midwife", "artist"]
    assert report.stereotypes == {"welder": "male", "midwife": "female", "artist": None}
    assert report.templates == ["{}", "a photo of {a} {}."]
    # each word: mean of its template embeddings, renormalised
    w = unit(*(welder + welder_photo))
    m = unit(*(E1 + unit(1, 0, 0.1)))
    assert report.association["welder"] == pytest.approx(float(w @ m - w @ E2), abs=1e-6)
    # X and Y have one profession each: the only two partitions, p = 1/2 (X above Y)
    assert report.p_value == pytest.approx(0.5) and report.effect_size > 0
    # Python lists work the same
    same = gender_profession_bias(
        FakeEncoder(vectors),
        {"welder": "male", "midwife": "female", "artist": None},
        ["man"],
        ["woman"],
        ["{}", "a photo of {a} {}."],
    )
    assert same.association == report.association


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"professions": ["nurse, nonbinary"]}, "'nonbinary'"),
        ({"professions": ["nurse", "nurse"]}, "'nurse' is listed twice"),
        ({"professions": []}, "professions list is empty"),
        ({"professions": "/does/not/exist.txt"}, "/does/not/exist.txt"),
        ({"male_terms": ["man", "woman"], "female_terms": ["woman"]}, "'woman' is both"),
        ({"templates": ["a photo of a person"]}, "a photo of a person"),
        ({"templates": "a {} and {}"}, "exactly one"),
        ({"top_k": 0}, "top_k"),
    ],
)
def test_bad_input_is_one_clear_error(kwargs, message):
    enc = encoder_for(SCORES)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        gender_profession_bias(
            enc,
            **{
                "professions": SPLIT,
                "male_terms": ["man"],
                "female_terms": ["woman"],
                "templates": ONE_TEMPLATE,
                **kwargs,
            },
        )


def test_cli_on_tiny_open_clip_matches_library(tmp_path, capsys):
    out, png = tmp_path / "bias.json", tmp_path / "bias.png"
    spec = str(TINY_OPEN_CLIP_CONFIG)
    template = "a photo of {a} {}."  # one template keeps the three encodings quick
    args = ["--model", spec, "--compare-to", spec, "--templates", template, "--top-k", "3"]
    rc = main([*args, "--permutations", "200", "--output", str(out), "--plot", str(png)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "most male-associated" in text and "most female-associated" in text
    assert "effect size d" in text and "Spearman rho" in text
    data = json.loads(out.read_text())
    assert {"model", "professions", "most_male", "most_female", "weat", "compare_to", "comparison"} <= set(
        data
    )
    assert len(data["professions"]) == 40 and len(data["most_male"]) == 3 and data["templates"] == [template]
    assert data["weat"]["partitions"] == 201 and data["weat"]["p_value_exact"] is False
    assert data["comparison"]["spearman_rho"] == pytest.approx(1.0)  # same seed: the same random model
    assert png.read_bytes()[:4] == b"\x89PNG"

    torch.manual_seed(0)  # the CLI seeds torch with --seed (0) before loading the random-weight config
    report = gender_profession_bias(spec, templates=[template], permutations=200, top_k=3, seed=0)
    assert report.model == data["model"] == spec
    for row in data["professions"]:
        assert row["association"] == pytest.approx(report.association[row["profession"]], abs=1e-6)
    assert [r["profession"] for r in data["most_male"]] == [p for p, _ in report.most_male]
    assert data["weat"]["effect_size"] == pytest.approx(report.effect_size, abs=1e-6)
    assert data["weat"]["p_value"] == pytest.approx(report.p_value)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmkd.eval.bias", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_cli_help_documents_every_option():
    res = _cli("--help")
    assert res.returncode == 0
    for option in (
        "--model",
        "--pretrained",
        "--compare-to",
        "--compare-to-pretrained",
        "--professions",
        "--male-terms",
        "--female-terms",
        "--templates",
        "--plot",
        "--output",
        "--top-k",
        "--permutations",
        "--seed",
    ):
        assert option in res.stdout


def test_cli_missing_professions_file_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "no_such_professions.txt"
    res = _cli("--model", str(TINY_OPEN_CLIP_CONFIG), "--professions", str(missing))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "Traceback" not in res.stderr


def test_cli_bad_model_spec_exits_2(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing.json"), "--professions", str(DEFAULT_PROFESSIONS)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.json" in err[0]
