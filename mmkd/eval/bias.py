"""Gender-profession association in a CLIP text tower, and how it carries over from teacher to student.

Every word (profession or gender term) is put into caption templates, encoded by the model's text tower, and its
L2-normalised template embeddings are averaged and renormalised (CLIP's prompt ensembling, Radford et al. 2021).
With ``p`` a profession embedding, ``A`` the male-term and ``B`` the female-term embeddings:

* ``mean_cos_male(p) = mean_{a in A} cos(p, a)``, ``mean_cos_female(p) = mean_{b in B} cos(p, b)``;
* association ``s(p) = mean_cos_male(p) - mean_cos_female(p)``: **positive = male-associated**, negative =
  female-associated. ``most_male`` are the ``top_k`` highest scores, ``most_female`` the ``top_k`` lowest (lowest
  first; a model may lean male overall, so a "most female" score can still be positive).

WEAT (Caliskan, Bryson & Narayanan, "Semantics derived automatically from language corpora contain human-like
biases", Science 356, 2017), with target sets X = professions stereotyped male, Y = professions stereotyped female
and attribute sets A = male terms, B = female terms; ``s(w) = s(w, A, B)`` is the association above:

* effect size ``d = (mean_{x in X} s(x) - mean_{y in Y} s(y)) / std_{w in X u Y} s(w)``, with the *sample*
  standard deviation (``ddof=1``);
* one-sided permutation test of the statistic ``t(X, Y) = mean_X s - mean_Y s`` (for ``|X| = |Y|`` this is
  Caliskan's ``sum_X s - sum_Y s`` divided by ``|X|``, so the p-value is the same) over the re-partitions
  ``(X_i, Y_i)`` of ``X u Y`` into sets of sizes ``|X|`` and ``|Y|``: ``p = #{i : t(X_i, Y_i) >= t(X, Y)} / #{i}``.
  When ``C(|X|+|Y|, |X|) <= permutations`` every partition is enumerated (exact; the observed one is among them,
  so ``p >= 1 / C``). Otherwise ``permutations`` random partitions are drawn with ``numpy.random.default_rng(seed)``
  and the observed partition is counted with them: ``p = (#{random i : t_i >= t} + 1) / (permutations + 1)``,
  never 0. Ties within 1e-10 (relative) count as ``>=``.

A large positive ``d`` means the model puts male-stereotyped professions closer to male terms than
female-stereotyped ones; ``d`` is unitless (roughly -2..2) and comparable across models whose raw cosines differ.

Word lists (``mmkd/eval/data``; one entry a line, lines starting with ``#`` and blank lines skipped):

* ``bias_professions.txt``: the 40 occupations of WinoBias (Zhao et al., NAACL 2018, Table 1;
  github.com/uclanlp/corefBias), 20 male-dominated and 20 female-dominated by US Bureau of Labor Statistics
  data, written ``profession, male|female``. A line without a stereotype is scored but is in neither X nor Y.
* ``bias_male_terms.txt`` / ``bias_female_terms.txt``: 12 matched pairs (man/woman, boy/girl, father/mother,
  son/daughter, brother/sister, husband/wife, gentleman/lady, uncle/aunt, nephew/niece, grandfather/grandmother,
  king/queen, male/female), from Bolukbasi et al. (NeurIPS 2016) definitional pairs and Caliskan et al.'s WEAT 7/8
  attribute words, extended with kinship/title pairs. Pronouns and plurals (he, men) are left out: every word goes
  through the same caption templates, and "a photo of a he." is not a caption.
* ``bias_templates.txt``: four of CLIP's 80 ImageNet zero-shot templates ("a photo of {a} {}.", "a close-up photo
  of {a} {}.", "a good photo of {a} {}.", "a drawing of {a} {}."), averaged. ``{}`` is the word and the optional
  ``{a}`` its indefinite article ("an accountant", "a nurse").

Each list can be overridden by a file path or a Python list (professions also by ``(name, stereotype)`` pairs or a
``{name: stereotype}`` mapping; a string entry uses the file syntax). Templates may also be given as one template
string (anything containing ``{``).

    >>> report = gender_profession_bias("openai/clip-vit-base-patch32")
    >>> student = gender_profession_bias("out/student")
    >>> compare_bias(report, student)["spearman_rho"]
    >>> mmkd.reporting.plots.bias_plot(report, compare_to=student, path="bias.png")

CLI: ``python -m mmkd.eval.bias --model out/student --compare-to openai/clip-vit-base-patch32 --plot bias.png``.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import string
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_PROFESSIONS = DATA_DIR / "bias_professions.txt"
DEFAULT_MALE_TERMS = DATA_DIR / "bias_male_terms.txt"
DEFAULT_FEMALE_TERMS = DATA_DIR / "bias_female_terms.txt"
DEFAULT_TEMPLATES = DATA_DIR / "bias_templates.txt"

STEREOTYPES = ("male", "female")
SIGN_CONVENTION = (
    "association = mean cos(profession, male terms) - mean cos(profession, female terms); "
    "positive = male-associated"
)
_TIE_TOLERANCE = 1e-10
_CHUNK = 65536

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------- word lists


def read_list_file(path: PathLike, what: str = "word list") -> list[str]:
    """Entries of a list file: stripped lines, skipping blank lines and ``#`` comment lines."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {what} file {str(path)!r}: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _parse_profession(entry: str, where: str) -> tuple[str, str | None]:
    parts = [part.strip() for part in entry.split(",")]
    if len(parts) > 2 or not parts[0]:
        raise ValueError(f"{where}: expected 'profession' or 'profession, male|female', got {entry!r}")
    return parts[0], _check_stereotype(parts[1] if len(parts) == 2 else None, parts[0], where)


def _check_stereotype(label, name: str, where: str) -> str | None:
    if label is None or label == "":
        return None
    if not isinstance(label, str) or label.strip().lower() not in STEREOTYPES:
        raise ValueError(
            f"{where}: stereotype of {name!r} must be 'male' or 'female' (or none), got {label!r}"
        )
    return label.strip().lower()


def _check_unique(words: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for w in words:
        if w in seen:
            raise ValueError(f"{what}: {w!r} is listed twice")
        seen.add(w)


def load_professions(professions=None) -> tuple[list[str], list[str | None]]:
    """Profession names and their stereotypes (``'male'``, ``'female'`` or ``None``).

    ``professions``: ``None`` (the shipped WinoBias list), a file path, a ``{name: stereotype}`` mapping, or a
    sequence of strings (file syntax: ``"nurse"`` or ``"nurse, female"``) and/or ``(name, stereotype)`` pairs.
    """
    if professions is None:
        professions = DEFAULT_PROFESSIONS
    entries: list[tuple[str, str | None]] = []
    if isinstance(professions, (str, os.PathLike)):
        for i, line in enumerate(read_list_file(professions, "professions"), 1):
            entries.append(_parse_profession(line, f"professions file {str(professions)!r}, entry {i}"))
    elif isinstance(professions, Mapping):
        for name, label in professions.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"professions: names must be non-empty strings, got {name!r}")
            entries.append((name.strip(), _check_stereotype(label, name, "professions")))
    elif isinstance(professions, Iterable):
        for item in professions:
            if isinstance(item, str):
                entries.append(_parse_profession(item, "professions"))
            elif (
                isinstance(item, (tuple, list))
                and len(item) == 2
                and isinstance(item[0], str)
                and item[0].strip()
            ):
                entries.append((item[0].strip(), _check_stereotype(item[1], item[0], "professions")))
            else:
                raise ValueError(f"professions: expected a name or a (name, stereotype) pair, got {item!r}")
    else:
        raise TypeError(
            f"professions must be a file path, a list or a mapping, got {type(professions).__name__}"
        )
    if not entries:
        raise ValueError(f"professions {_describe(professions)} is empty")
    names = [n for n, _ in entries]
    _check_unique(names, "professions")
    return names, [s for _, s in entries]


def load_terms(terms, default: Path, what: str) -> list[str]:
    """A word list from ``None`` (``default``), a file path or a sequence of strings."""
    if terms is None:
        terms = default
    if isinstance(terms, (str, os.PathLike)):
        words = read_list_file(terms, what)
    elif isinstance(terms, Iterable):
        words = []
        for w in terms:
            if not isinstance(w, str) or not w.strip():
                raise ValueError(f"{what}: entries must be non-empty strings, got {w!r}")
            words.append(w.strip())
    else:
        raise TypeError(f"{what} must be a file path or a list of strings, got {type(terms).__name__}")
    if not words:
        raise ValueError(f"{what} {_describe(terms)} is empty")
    _check_unique(words, what)
    return words


def load_templates(templates=None) -> list[str]:
    """Caption templates from ``None`` (the shipped four), one template string (contains ``{``), a file path or
    a list; each must hold exactly one ``{}`` (the word) and may hold ``{a}`` (its indefinite article)."""
    if templates is None:
        templates = DEFAULT_TEMPLATES
    if isinstance(templates, str) and "{" in templates:
        templates = [templates]
    items = load_terms(templates, DEFAULT_TEMPLATES, "templates")
    for t in items:
        _check_template(t)
    return items


def _check_template(template: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a valid format string: {e}") from e
    if fields.count("") != 1 or any(f not in ("", "a") for f in fields):
        raise ValueError(
            f"template {template!r} must contain exactly one '{{}}' (the word) and optionally '{{a}}'"
        )


def _describe(source) -> str:
    return repr(str(source)) if isinstance(source, (str, os.PathLike)) else "list"


def indefinite_article(word: str) -> str:
    """``'an'`` before a vowel sound, else ``'a'`` (spelling rule with the common exceptions)."""
    w = word.strip().lower()
    if w.startswith(("hour", "honest", "honor", "honour", "heir")):
        return "an"
    if w.startswith(("uni", "use", "usu", "eu", "one", "once")):
        return "a"
    return "an" if w[:1] in tuple("aeiou") else "a"


def build_prompts(word: str, templates: Sequence[str]) -> list[str]:
    """``word`` put into each template (``{}`` = word, ``{a}`` = its indefinite article)."""
    return [t.format(word, a=indefinite_article(word)) for t in templates]


@dataclass
class WordLists:
    """Resolved inputs of :func:`gender_profession_bias`."""

    professions: list[str]
    stereotypes: list[str | None]
    male_terms: list[str]
    female_terms: list[str]
    templates: list[str]


def load_word_lists(professions=None, male_terms=None, female_terms=None, templates=None) -> WordLists:
    """Resolve and validate all word lists (``None`` = the shipped ones); see the module docstring."""
    names, stereotypes = load_professions(professions)
    male = load_terms(male_terms, DEFAULT_MALE_TERMS, "male terms")
    female = load_terms(female_terms, DEFAULT_FEMALE_TERMS, "female terms")
    both = sorted(set(male) & set(female))
    if both:
        raise ValueError(f"{both[0]!r} is both a male and a female term")
    return WordLists(names, stereotypes, male, female, load_templates(templates))


# --------------------------------------------------------------------------------------------- WEAT


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def weat_effect_size(s_x: Sequence[float], s_y: Sequence[float]) -> float | None:
    """``(mean s_x - mean s_y) / std(s_x u s_y, ddof=1)``; ``None`` when a set is empty or the std is 0."""
    s_x, s_y = np.asarray(s_x, dtype=np.float64), np.asarray(s_y, dtype=np.float64)
    if len(s_x) == 0 or len(s_y) == 0:
        return None
    values = np.concatenate([s_x, s_y])
    std = float(np.std(values, ddof=1))
    if not std > _TIE_TOLERANCE * max(1.0, float(np.abs(values).max())):  # all equal up to rounding
        return None
    return float((s_x.mean() - s_y.mean()) / std)


def weat_p_value(
    s_x: Sequence[float], s_y: Sequence[float], permutations: int = 10000, seed: int = 0
) -> tuple[float | None, bool | None, int | None]:
    """One-sided permutation p-value of ``mean s_x - mean s_y`` over re-partitions of ``s_x u s_y``.

    Returns ``(p, exact, partitions)``: exact enumeration when ``C(n, |X|) <= permutations`` (``partitions`` =
    ``C(n, |X|)``), else ``permutations`` seeded random partitions plus the observed one (``partitions`` =
    ``permutations + 1``). ``(None, None, None)`` when a set is empty.
    """
    _check_positive_int(permutations, "permutations")
    permutations = int(permutations)
    s_x, s_y = np.asarray(s_x, dtype=np.float64), np.asarray(s_y, dtype=np.float64)
    nx, ny = len(s_x), len(s_y)
    if nx == 0 or ny == 0:
        return None, None, None
    values = np.concatenate([s_x, s_y])
    n, total = len(values), float(values.sum())
    observed = float(s_x.mean() - s_y.mean())
    threshold = observed - _TIE_TOLERANCE * max(1.0, float(np.abs(values).max()))

    def count_at_least(x_sums: np.ndarray) -> int:
        return int(np.count_nonzero(x_sums / nx - (total - x_sums) / ny >= threshold))

    n_partitions = math.comb(n, nx)
    if n_partitions <= permutations:
        combos = itertools.combinations(range(n), nx)
        hits = 0
        while block := list(itertools.islice(combos, _CHUNK)):
            hits += count_at_least(values[np.asarray(block, dtype=np.intp)].sum(axis=1))
        return hits / n_partitions, True, n_partitions
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    while done < permutations:
        b = min(_CHUNK, permutations - done)
        order = rng.permuted(np.broadcast_to(np.arange(n), (b, n)), axis=1)
        hits += count_at_least(values[order[:, :nx]].sum(axis=1))
        done += b
    return (hits + 1) / (permutations + 1), False, permutations + 1


# --------------------------------------------------------------------------------------------- report


@dataclass
class BiasReport:
    """Per-profession gender association of one model, its top-k lists and the WEAT statistics.

    ``association[p] = male_similarity[p] - female_similarity[p]`` (positive = male-associated); dicts keep the
    order of the professions list. ``most_male`` / ``most_female`` are ``(profession, association)`` pairs, most
    extreme first. ``effect_size`` / ``p_value`` are ``None`` when the professions lack a male or a female
    stereotyped subset (or the scores are all equal).
    """

    model: str
    association: dict[str, float]
    male_similarity: dict[str, float]
    female_similarity: dict[str, float]
    stereotypes: dict[str, str | None]
    most_male: list[tuple[str, float]]
    most_female: list[tuple[str, float]]
    effect_size: float | None
    p_value: float | None
    p_value_exact: bool | None
    partitions: int | None
    male_terms: list[str] = field(default_factory=list)
    female_terms: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    top_k: int = 5
    permutations: int = 10000
    seed: int = 0

    @property
    def professions(self) -> list[str]:
        return list(self.association)

    @property
    def n_male_stereotyped(self) -> int:
        return sum(s == "male" for s in self.stereotypes.values())

    @property
    def n_female_stereotyped(self) -> int:
        return sum(s == "female" for s in self.stereotypes.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``BiasReport.from_dict`` reads it back)."""
        return {
            "model": self.model,
            "sign_convention": SIGN_CONVENTION,
            "templates": list(self.templates),
            "male_terms": list(self.male_terms),
            "female_terms": list(self.female_terms),
            "professions": [
                {
                    "profession": p,
                    "stereotype": self.stereotypes.get(p),
                    "mean_cos_male": self.male_similarity[p],
                    "mean_cos_female": self.female_similarity[p],
                    "association": a,
                }
                for p, a in self.association.items()
            ],
            "top_k": self.top_k,
            "most_male": [{"profession": p, "association": a} for p, a in self.most_male],
            "most_female": [{"profession": p, "association": a} for p, a in self.most_female],
            "weat": {
                "effect_size": self.effect_size,
                "p_value": self.p_value,
                "p_value_exact": self.p_value_exact,
                "partitions": self.partitions,
                "n_male_stereotyped": self.n_male_stereotyped,
                "n_female_stereotyped": self.n_female_stereotyped,
                "std_ddof": 1,
                "permutations": self.permutations,
                "seed": self.seed,
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BiasReport:
        """Inverse of :meth:`to_dict`."""
        try:
            rows = data["professions"]
            weat = data["weat"]
            return cls(
                model=data["model"],
                association={r["profession"]: float(r["association"]) for r in rows},
                male_similarity={r["profession"]: float(r["mean_cos_male"]) for r in rows},
                female_similarity={r["profession"]: float(r["mean_cos_female"]) for r in rows},
                stereotypes={r["profession"]: r.get("stereotype") for r in rows},
                most_male=[(r["profession"], float(r["association"])) for r in data["most_male"]],
                most_female=[(r["profession"], float(r["association"])) for r in data["most_female"]],
                effect_size=weat["effect_size"],
                p_value=weat["p_value"],
                p_value_exact=weat["p_value_exact"],
                partitions=weat["partitions"],
                male_terms=list(data.get("male_terms", [])),
                female_terms=list(data.get("female_terms", [])),
                templates=list(data.get("templates", [])),
                top_k=int(data.get("top_k", len(data["most_male"]))),
                permutations=int(weat.get("permutations", 10000)),
                seed=int(weat.get("seed", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a BiasReport dict (missing or bad field {e})") from e


def as_report(report) -> BiasReport:
    if isinstance(report, BiasReport):
        return report
    if isinstance(report, Mapping):
        return BiasReport.from_dict(report)
    raise TypeError(f"expected a BiasReport or its to_dict() form, got {type(report).__name__}")


def _top(scores: Mapping[str, float], k: int, male: bool) -> list[tuple[str, float]]:
    names = list(scores)
    values = np.array([scores[n] for n in names])
    order = np.argsort(-values if male else values, kind="stable")[:k]
    return [(names[i], float(values[i])) for i in order]


def _embeddings(encoder, prompts: list[str]) -> np.ndarray:
    out = encoder.encode_texts(prompts)
    if hasattr(out, "detach"):  # a torch tensor
        out = out.detach().cpu().double().numpy()
    emb = np.asarray(out, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(prompts):
        raise ValueError(
            f"encode_texts returned shape {emb.shape} for {len(prompts)} prompts; expected ({len(prompts)}, E)"
        )
    return emb


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norm == 0) or not np.all(np.isfinite(x)):
        raise ValueError("the encoder returned a zero or non-finite text embedding")
    return x / norm


def _resolve_encoder(model, pretrained, processor, device):
    if not isinstance(model, (str, os.PathLike)) and hasattr(model, "encode_texts"):
        if device is not None and hasattr(model, "to"):
            model.to(device)
        return model, getattr(model, "name", None) or type(model).__name__
    from mmkd.eval.encoders import load_encoder

    spec = os.fspath(model) if isinstance(model, os.PathLike) else model
    encoder = load_encoder(spec, pretrained=pretrained, processor=processor, device=device)
    name = spec if isinstance(spec, str) else getattr(encoder, "name", type(model).__name__)
    if isinstance(spec, str) and pretrained is not None:
        name = f"{spec} ({pretrained})"
    return encoder, name


def gender_profession_bias(
    model,
    professions=None,
    male_terms=None,
    female_terms=None,
    templates=None,
    pretrained: str | None = None,
    processor=None,
    permutations: int = 10000,
    seed: int = 0,
    top_k: int = 5,
    device=None,
) -> BiasReport:
    """Measure the gender-profession association of ``model``'s text tower (formulas: module docstring).

    Args:
        model: anything :func:`mmkd.eval.encoders.load_encoder` takes (a model spec string — transformers
            ``CLIPModel`` directory / hub id, open_clip name, ``*.json`` config —, a ``CLIPTeacher``, a live
            ``CLIPModel`` with ``processor``), or any object with ``encode_texts(list[str]) -> (N, E)``.
        professions, male_terms, female_terms, templates: word-list overrides (paths or lists; ``None`` = the
            shipped lists, see the module docstring).
        pretrained: open_clip pretrained tag or checkpoint, for a model spec string.
        processor: the processor of a live transformers ``CLIPModel``.
        permutations: budget of the WEAT permutation test (exact enumeration when the partitions fit in it).
        seed: seed of the random partitions.
        top_k: length of ``most_male`` / ``most_female`` (capped at the number of professions).
        device: optional device to move the model to.
    """
    _check_positive_int(top_k, "top_k")
    _check_positive_int(permutations, "permutations")
    top_k, permutations = int(top_k), int(permutations)
    lists = load_word_lists(professions, male_terms, female_terms, templates)
    encoder, name = _resolve_encoder(model, pretrained, processor, device)

    words = lists.professions + lists.male_terms + lists.female_terms
    prompts = [p for w in words for p in build_prompts(w, lists.templates)]
    emb = _normalise(_embeddings(encoder, prompts)).reshape(len(words), len(lists.templates), -1)
    emb = _normalise(emb.mean(axis=1))
    n_p, n_m = len(lists.professions), len(lists.male_terms)
    prof, male, female = emb[:n_p], emb[n_p : n_p + n_m], emb[n_p + n_m :]
    cos_male = (prof @ male.T).mean(axis=1)
    cos_female = (prof @ female.T).mean(axis=1)
    scores = cos_male - cos_female

    association = {p: float(s) for p, s in zip(lists.professions, scores, strict=True)}
    stereotypes = dict(zip(lists.professions, lists.stereotypes, strict=True))
    s_x = [association[p] for p, s in stereotypes.items() if s == "male"]
    s_y = [association[p] for p, s in stereotypes.items() if s == "female"]
    p_value, exact, partitions = weat_p_value(s_x, s_y, permutations=permutations, seed=seed)
    k = min(top_k, n_p)
    return BiasReport(
        model=str(name),
        association=association,
        male_similarity={p: float(c) for p, c in zip(lists.professions, cos_male, strict=True)},
        female_similarity={p: float(c) for p, c in zip(lists.professions, cos_female, strict=True)},
        stereotypes=stereotypes,
        most_male=_top(association, k, male=True),
        most_female=_top(association, k, male=False),
        effect_size=weat_effect_size(s_x, s_y),
        p_value=p_value,
        p_value_exact=exact,
        partitions=partitions,
        male_terms=lists.male_terms,
        female_terms=lists.female_terms,
        templates=lists.templates,
        top_k=top_k,
        permutations=permutations,
        seed=seed,
    )


# --------------------------------------------------------------------------------------------- comparison


def _finite_or_none(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def compare_bias(teacher_report, student_report) -> dict[str, Any]:
    """How a student's gender-profession associations relate to its teacher's.

    Both reports may be :class:`BiasReport` objects or their ``to_dict()`` form; they are compared on the
    professions they share (at least 2), in the teacher's order. Returns a JSON-ready dict:

    * ``spearman_rho`` / ``spearman_p``: ``scipy.stats.spearmanr`` of the per-profession associations (``None``
      when undefined, e.g. constant scores);
    * ``effect_size_teacher``, ``effect_size_student``, ``effect_size_change`` (student - teacher; ``None`` when
      either is undefined);
    * ``mean_abs_change``: mean |student - teacher| association;
    * ``flipped``: professions whose association changed sign (``teacher * student < 0``; an exact 0 has no
      direction), with both scores;
    * ``top_k``, ``most_male_overlap`` / ``most_female_overlap``: the top-k lists of both models recomputed on the
      shared professions (k = the smaller ``top_k``), the professions in both, and their fraction of k.
    """
    from scipy import stats

    teacher, student = as_report(teacher_report), as_report(student_report)
    common = [p for p in teacher.association if p in student.association]
    if len(common) < 2:
        raise ValueError(
            f"the reports share {len(common)} profession(s); comparing needs at least 2 "
            f"(teacher {teacher.model!r}, student {student.model!r})"
        )
    t = np.array([teacher.association[p] for p in common])
    s = np.array([student.association[p] for p in common])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho, rho_p = stats.spearmanr(t, s)
    d_t, d_s = teacher.effect_size, student.effect_size
    k = min(teacher.top_k, student.top_k, len(common))

    def overlap(male: bool) -> dict[str, Any]:
        top_t = [p for p, _ in _top({p: teacher.association[p] for p in common}, k, male)]
        top_s = [p for p, _ in _top({p: student.association[p] for p in common}, k, male)]
        shared = [p for p in top_t if p in top_s]
        return {"teacher": top_t, "student": top_s, "common": shared, "fraction": len(shared) / k}

    return {
        "teacher": teacher.model,
        "student": student.model,
        "professions_compared": len(common),
        "spearman_rho": _finite_or_none(rho),
        "spearman_p": _finite_or_none(rho_p),
        "effect_size_teacher": d_t,
        "effect_size_student": d_s,
        "effect_size_change": None if d_t is None or d_s is None else float(d_s - d_t),
        "p_value_teacher": teacher.p_value,
        "p_value_student": student.p_value,
        "mean_abs_change": float(np.mean(np.abs(s - t))),
        "flipped": [
            {"profession": p, "teacher": float(a), "student": float(b)}
            for p, a, b in zip(common, t, s, strict=True)
            if a * b < 0
        ],
        "top_k": k,
        "most_male_overlap": overlap(male=True),
        "most_female_overlap": overlap(male=False),
    }


# --------------------------------------------------------------------------------------------- plot


# --------------------------------------------------------------------------------------------- CLI


__all__ = [
    "BiasReport",
    "WordLists",
    "build_prompts",
    "compare_bias",
    "gender_profession_bias",
    "indefinite_article",
    "load_professions",
    "load_templates",
    "load_terms",
    "load_word_lists",
    "as_report",
    "read_list_file",
    "weat_effect_size",
    "weat_p_value",
]


if __name__ == "__main__":
    import sys

    from mmkd.cli import run_command

    sys.exit(run_command("bias", sys.argv[1:], prog="python -m mmkd.eval.bias"))
