"""``mmkd bias``: gender-profession association of a model's text tower, optionally against a teacher
(:mod:`mmkd.eval.bias`)::

    mmkd bias --model out/student --compare-to openai/clip-vit-base-patch32 --plot bias.png --output bias.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mmkd.cli import CommandError, one_line
from mmkd.eval.bias import SIGN_CONVENTION, BiasReport, compare_bias, gender_profession_bias
from mmkd.eval.bias_words import load_word_lists
from mmkd.reporting.plots import bias_plot
from mmkd.reporting.tables import fmt


def format_report(report: BiasReport, title: str | None = None) -> str:
    """A readable table: top male / female professions side by side, then the WEAT statistics."""
    lines = [f"== {title or 'Gender-profession bias'}: {report.model}"]
    lines.append(
        f"   {len(report.association)} professions, {len(report.male_terms)} male / {len(report.female_terms)} "
        f"female terms, {len(report.templates)} template(s)"
    )
    lines.append(f"   {SIGN_CONVENTION}")
    width = max([len(p) for p, _ in report.most_male + report.most_female] + [12])
    lines.append(f"   {'most male-associated':<{width + 16}}most female-associated")
    for i in range(max(len(report.most_male), len(report.most_female))):
        left = right = ""
        if i < len(report.most_male):
            p, a = report.most_male[i]
            left = f"{i + 1:>2}. {p:<{width}} {a:+.4f}"
        if i < len(report.most_female):
            p, a = report.most_female[i]
            right = f"{i + 1:>2}. {p:<{width}} {a:+.4f}"
        lines.append(f"   {left:<{width + 16}}{right}")
    if report.effect_size is None and report.p_value is None:
        lines.append("   WEAT: n/a (needs professions stereotyped male and female, with differing scores)")
    else:
        how = "exact" if report.p_value_exact else "random"
        lines.append(
            f"   WEAT (X = {report.n_male_stereotyped} male-, Y = {report.n_female_stereotyped} female-stereotyped "
            f"professions): effect size d = {fmt(report.effect_size, '+.3f')}, one-sided p = "
            f"{fmt(report.p_value, '.4g')} ({report.partitions} partitions, {how})"
        )
    return "\n".join(lines)


def format_comparison(cmp: Mapping[str, Any]) -> str:
    """A readable summary of :func:`compare_bias`'s result."""
    flipped = ", ".join(
        f"{f['profession']} ({f['teacher']:+.3f} → {f['student']:+.3f})" for f in cmp["flipped"]
    )
    mm, mf = cmp["most_male_overlap"], cmp["most_female_overlap"]
    return "\n".join(
        [
            f"== Comparison: teacher {cmp['teacher']} vs student {cmp['student']} "
            f"({cmp['professions_compared']} professions)",
            f"   Spearman rho = {fmt(cmp['spearman_rho'], '.4f')} (p = {fmt(cmp['spearman_p'], '.3g')}), "
            f"mean |change| = {cmp['mean_abs_change']:.4f}",
            f"   effect size: teacher {fmt(cmp['effect_size_teacher'], '+.3f')}, student "
            f"{fmt(cmp['effect_size_student'], '+.3f')}, change {fmt(cmp['effect_size_change'], '+.3f')}",
            f"   top-{cmp['top_k']} most male shared: {len(mm['common'])}/{cmp['top_k']} "
            f"({', '.join(mm['common']) or 'none'})",
            f"   top-{cmp['top_k']} most female shared: {len(mf['common'])}/{cmp['top_k']} "
            f"({', '.join(mf['common']) or 'none'})",
            f"   direction flipped ({len(cmp['flipped'])}): {flipped or 'none'}",
        ]
    )


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Gender-profession association in a CLIP text tower (mean cosine to male minus female term "
        "prompts; positive = male-associated), WEAT effect size and permutation p-value, and optionally the "
        "comparison with a teacher.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="model to measure: transformers CLIPModel directory or hub id, "
        "open_clip name, hf-hub:/local-dir: id, or open_clip *.json config",
    )
    parser.add_argument("--pretrained", help="open_clip pretrained tag or checkpoint for --model")
    parser.add_argument(
        "--compare-to", metavar="T", help="reference (teacher) model spec to compare --model with"
    )
    parser.add_argument(
        "--compare-to-pretrained", metavar="P2", help="open_clip pretrained tag/checkpoint for T"
    )
    parser.add_argument(
        "--professions",
        metavar="FILE",
        help="professions file: one 'profession' or "
        "'profession, male|female' a line, '#' comments (default: the shipped WinoBias list)",
    )
    parser.add_argument(
        "--male-terms", metavar="FILE", help="male terms file, one a line (default: shipped list)"
    )
    parser.add_argument(
        "--female-terms", metavar="FILE", help="female terms file, one a line (default: shipped list)"
    )
    parser.add_argument(
        "--templates",
        nargs="+",
        metavar="T",
        help="caption templates with '{}' for the word and "
        "optional '{a}' for its article (e.g. 'a photo of {a} {}.'), or one file of them; "
        "averaged (default: four CLIP ImageNet templates)",
    )
    parser.add_argument(
        "--plot", metavar="PNG", help="write a bar chart (with --compare-to: bars + scatter) here"
    )
    parser.add_argument("--output", metavar="JSON", help="write the report (and comparison) as JSON here")
    parser.add_argument("--top-k", type=int, default=5, help="professions listed each way (default 5)")
    parser.add_argument(
        "--permutations",
        type=int,
        default=10000,
        help="WEAT permutation-test budget; exact enumeration when the partitions fit in it (default 10000)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random partitions; also seeds torch before "
        "loading, so a random-weight *.json config gives the same model every run (default 0)",
    )
    parser.add_argument("--device", help="device to run the model on (default: where it loads, the CPU)")
    return parser


def _templates_arg(values: list[str] | None):
    if not values:
        return None
    if len(values) == 1 and "{" not in values[0]:
        return values[0]  # a file
    bad = [v for v in values if "{" not in v]
    if bad:
        raise ValueError(
            f"--templates: {bad[0]!r} is not a template (no '{{}}') and only a single file may be given"
        )
    return values


@contextlib.contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """Hide the hub client's retry chatter while loading, so a bad spec ends in one error line."""
    import transformers  # noqa: F401  (importing it resets the hub's log level, so do it first)

    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run(args: argparse.Namespace, prog: str) -> int:
    """Measure (and compare), print, plot and write the report; bad input raises before any model is loaded."""
    for flag, value in (("--top-k", args.top_k), ("--permutations", args.permutations)):
        if value < 1:
            raise CommandError(f"{flag} must be a positive integer, got {value}")
    try:
        lists = load_word_lists(
            args.professions, args.male_terms, args.female_terms, _templates_arg(args.templates)
        )
    except (OSError, ValueError, TypeError) as e:
        raise CommandError(one_line(e)) from None

    import torch

    from mmkd.eval.encoders import load_encoder

    encoders = {}
    for key, spec, pretrained in (
        ("model", args.model, args.pretrained),
        ("compare_to", args.compare_to, args.compare_to_pretrained),
    ):
        if spec is None:
            continue
        torch.manual_seed(args.seed)
        try:
            with _quiet_hub_logs():
                encoders[key] = load_encoder(spec, pretrained=pretrained, device=args.device)
        except Exception as e:  # any failure to load a user-given spec is a bad-input error, not a crash
            raise CommandError(f"cannot load model {spec!r}: {one_line(e)}") from None

    def measure(key: str, spec: str, pretrained: str | None) -> BiasReport:
        report = gender_profession_bias(
            encoders[key],
            [(p, s) for p, s in zip(lists.professions, lists.stereotypes, strict=True)],
            lists.male_terms,
            lists.female_terms,
            lists.templates,
            permutations=args.permutations,
            seed=args.seed,
            top_k=args.top_k,
        )
        report.model = spec if pretrained is None else f"{spec} ({pretrained})"
        return report

    report = measure("model", args.model, args.pretrained)
    result = report.to_dict()
    print(format_report(report, "Gender-profession bias" if args.compare_to is None else "Student"))
    if args.compare_to is not None:
        teacher = measure("compare_to", args.compare_to, args.compare_to_pretrained)
        cmp = compare_bias(teacher, report)
        result["compare_to"] = teacher.to_dict()
        result["comparison"] = cmp
        print()
        print(format_report(teacher, "Teacher"))
        print()
        print(format_comparison(cmp))
    try:
        if args.plot:
            if args.compare_to is None:
                bias_plot(report, path=args.plot)
            else:
                bias_plot(teacher, compare_to=report, path=args.plot, labels=("teacher", "student"))
            print(f"\nplot written to {args.plot}")
        if args.output:
            out = Path(args.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"report written to {args.output}")
    except OSError as e:
        raise CommandError(one_line(e)) from None
    return 0
