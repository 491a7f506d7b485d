"""Word lists and caption prompts of the gender-profession bias measure (:mod:`mmkd.eval.bias`).

Shipped lists (``mmkd/eval/data``; one entry a line, lines starting with ``#`` and blank lines skipped):

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
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_FEMALE_TERMS",
    "DEFAULT_MALE_TERMS",
    "DEFAULT_PROFESSIONS",
    "DEFAULT_TEMPLATES",
    "STEREOTYPES",
    "WordLists",
    "build_prompts",
    "indefinite_article",
    "load_professions",
    "load_templates",
    "load_terms",
    "load_word_lists",
    "read_list_file",
]

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_PROFESSIONS = DATA_DIR / "bias_professions.txt"
DEFAULT_MALE_TERMS = DATA_DIR / "bias_male_terms.txt"
DEFAULT_FEMALE_TERMS = DATA_DIR / "bias_female_terms.txt"
DEFAULT_TEMPLATES = DATA_DIR / "bias_templates.txt"

STEREOTYPES = ("male", "female")

PathLike = str | os.PathLike


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


def _describe(source) -> str:
    return repr(str(source)) if isinstance(source, (str, os.PathLike)) else "list"


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
    """Resolved inputs of :func:`mmkd.eval.bias.gender_profession_bias`."""

    professions: list[str]
    stereotypes: list[str | None]
    male_terms: list[str]
    female_terms: list[str]
    templates: list[str]


def load_word_lists(professions=None, male_terms=None, female_terms=None, templates=None) -> WordLists:
    """Resolve and validate all word lists (``None`` = the shipped ones; overrides: the module docstring)."""
    names, stereotypes = load_professions(professions)
    male = load_terms(male_terms, DEFAULT_MALE_TERMS, "male terms")
    female = load_terms(female_terms, DEFAULT_FEMALE_TERMS, "female terms")
    both = sorted(set(male) & set(female))
    if both:
        raise ValueError(f"{both[0]!r} is both a male and a female term")
    return WordLists(names, stereotypes, male, female, load_templates(templates))
