"""Gender-profession association in a CLIP text tower, and how it carries over from teacher to student.

Every word (profession or gender term) is put into caption templates (:mod:`mmkd.eval.bias_words`: the shipped
WinoBias professions, gender terms and templates, and their overrides), encoded by the model's text tower, and
its L2-normalised template embeddings are averaged and renormalised (CLIP's prompt ensembling, Radford et al.
2021). With ``p`` a profession embedding, ``A`` the male-term and ``B`` the female-term embeddings:

* ``mean_cos_male(p) = mean_{a in A} cos(p, a)``, ``mean_cos_female(p) = mean_{b in B} cos(p, b)``;
* association ``s(p) = mean_cos_male(p) - mean_cos_female(p)``: **positive = male-associated**, negative =
  female-associated. ``most_male`` are the ``top_k`` highest scores, ``most_female`` the ``top_k`` lowest (lowest
  first; a model may lean male overall, so a "most female" score can still be positive).

WEAT (Caliskan, Bryson & Narayanan, "Semantics derived automatically from language corpora contain human-like
biases", Science 356, 2017), with target sets X = professions stereotyped male, Y = professions stereotyped female
and attribute sets A = male terms, B = female terms; ``s(w) = s(w, A, B)`` is the association above:

* effect size ``d = (mean_{x in X} s(x) - mean_{y in Y} s(y)) / std_{w in X u Y} s(w)``, with the *sample*
  standard deviation (``ddof=1``);
* one-sided p-value of ``t(X, Y) = mean_X s - mean_Y s`` (for ``|X| = |Y|`` Caliskan's ``sum_X s - sum_Y s``
  over ``|X|``: the same p-value) from ``scipy.stats.permutation_test`` (``permutation_type="independent"``,
  ``alternative="greater"``) over the re-partitions ``(X_i, Y_i)`` of ``X u Y`` into sets of sizes ``|X|``,
  ``|Y|``. When ``C = C(|X|+|Y|, |X|) <= permutations`` scipy enumerates every partition (exact; the observed
  one is among them, so ``p >= 1 / C``): ``p = #{i : t_i >= t - g} / C``. Otherwise it draws ``permutations``
  random permutations (uniform, with replacement, from ``numpy.random.default_rng(seed)``) and counts the
  observed partition with them: ``p = (#{i : t_i >= t - g} + 1) / (permutations + 1)``, never 0. The tie
  tolerance is scipy's, relative to the observed statistic: ``g = 100 * eps_float64 * |t|`` (2.2e-14 |t|).
  scipy refuses a set of one score; that case (``n`` partitions: which score forms the set) is computed by the
  same rule in numpy, its random partitions drawn as ``default_rng(seed).integers(n, size=permutations)``.

A large positive ``d`` means the model puts male-stereotyped professions closer to male terms than
female-stereotyped ones; ``d`` is unitless (roughly -2..2) and comparable across models whose raw cosines differ.

    >>> report = gender_profession_bias("openai/clip-vit-base-patch32")
    >>> student = gender_profession_bias("out/student")
    >>> compare_bias(report, student)["spearman_rho"]
    >>> mmkd.reporting.plots.bias_plot(report, compare_to=student, path="bias.png")

CLI: ``mmkd bias --model out/student --compare-to openai/clip-vit-base-patch32 --plot bias.png``
(:mod:`mmkd.cli.bias`; ``python -m mmkd.eval.bias`` runs the same command).
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmkd.eval.bias_words import build_prompts, load_word_lists

SIGN_CONVENTION = (
    "association = mean cos(profession, male terms) - mean cos(profession, female terms); "
    "positive = male-associated"
)
_TIE_TOLERANCE = 1e-10  # "all scores equal" in weat_effect_size
_BATCH = 65536  # partitions per scipy batch: bounds the memory of an exact enumeration

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


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def weat_p_value(
    s_x: Sequence[float], s_y: Sequence[float], permutations: int = 10000, seed: int = 0
) -> tuple[float | None, bool | None, int | None]:
    """One-sided ``scipy.stats.permutation_test`` p-value of ``mean s_x - mean s_y`` (module docstring).

    Returns ``(p, exact, partitions)``: exact enumeration when ``C(n, |X|) <= permutations`` (``partitions`` =
    ``C(n, |X|)``), else ``permutations`` seeded random partitions plus the observed one (``partitions`` =
    ``permutations + 1``). ``(None, None, None)`` when a set is empty.
    """
    from scipy import stats

    _check_positive_int(permutations, "permutations")
    permutations = int(permutations)
    s_x, s_y = np.asarray(s_x, dtype=np.float64), np.asarray(s_y, dtype=np.float64)
    if len(s_x) == 0 or len(s_y) == 0:
        return None, None, None
    n_partitions = math.comb(len(s_x) + len(s_y), len(s_x))
    exact = n_partitions <= permutations  # scipy's rule for enumerating
    partitions = n_partitions if exact else permutations + 1
    if min(len(s_x), len(s_y)) == 1:  # scipy needs two or more values per set
        return _singleton_p_value(s_x, s_y, permutations, seed, exact), exact, partitions
    result = stats.permutation_test(
        (s_x, s_y),
        _mean_difference,
        permutation_type="independent",
        vectorized=True,
        n_resamples=permutations,
        batch=_BATCH,
        alternative="greater",
        rng=np.random.default_rng(seed),
    )
    return float(result.pvalue), exact, partitions


def _singleton_p_value(s_x: np.ndarray, s_y: np.ndarray, permutations: int, seed: int, exact: bool) -> float:
    """scipy's rule for a set of one value: a partition is which value forms that set (``n`` of them)."""
    values = np.concatenate([s_x, s_y])
    rest = (values.sum() - values) / (len(values) - 1)  # mean of the other set, for each choice
    null = values - rest if len(s_x) == 1 else rest - values
    observed = float(_mean_difference(s_x, s_y))
    threshold = observed - 100 * np.finfo(np.float64).eps * abs(observed)
    if exact:
        return float(np.count_nonzero(null >= threshold) / len(values))
    drawn = null[np.random.default_rng(seed).integers(len(values), size=permutations)]
    return float((np.count_nonzero(drawn >= threshold) + 1) / (permutations + 1))


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
            shipped lists, see :mod:`mmkd.eval.bias_words`).
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


__all__ = [
    "SIGN_CONVENTION",
    "BiasReport",
    "as_report",
    "compare_bias",
    "gender_profession_bias",
    "weat_effect_size",
    "weat_p_value",
]


if __name__ == "__main__":
    import sys

    from mmkd.cli import run_command

    sys.exit(run_command("bias", sys.argv[1:], prog="python -m mmkd.eval.bias"))
