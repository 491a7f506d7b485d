"""The pieces every study of CLIP students shares (``recipes/feature_study.py``, ``recipes/kd_studies.py``): train a
student with ``recipes/clip_student.py`` into a folder -- reused when it holds a finished run of exactly the same
arguments -- evaluate it zero-shot on a classification set, and fold several seeds of one configuration into a row
(mean, standard deviation, the per-seed figures).

    runner = StudyRunner(Path("out/study"), test_set, templates)
    runs = [runner.run("kd", ["--config", ..., "--class_kd_weight", "1"], seed) for seed in (0, 1, 2)]
    row = {"name": "kd", **aggregate(runs)}
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["EVAL_RECORD", "RUN_RECORD", "StudyRunner", "aggregate", "close_pairs", "seconds_per_step"]

RUN_RECORD = "study_run.json"  # written last in a run's folder: the run finished with these arguments
EVAL_RECORD = "study_eval.json"  # the run's zero-shot figures, with what they were measured on
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def seconds_per_step(folder: Path) -> float:
    """Training seconds per step of a finished run, from ``Trainer``'s ``trainer_state.json``."""
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    runtime = next(e["train_runtime"] for e in reversed(state["log_history"]) if "train_runtime" in e)
    return float(runtime) / state["global_step"]


class StudyRunner:
    """Train and evaluate the students of a study under ``out``.

    Args:
        out: the study's folder; run ``name`` with seed ``s`` trains into ``out / f"{name}-seed{s}"``.
        test: the zero-shot classification set (:class:`mmkd.eval.datasets.ClassificationDataset`).
        templates: its prompt templates (``{c}``).
        recipe: the training script (default ``recipes/clip_student.py``), called in-process through ``main(argv)``.
    """

    def __init__(self, out: Path, test, templates: Sequence[str], recipe: Path | None = None):
        self.out, self.test, self.templates = Path(out), test, list(templates)
        self.recipe = recipe or RECIPES / "clip_student.py"
        self.out.mkdir(parents=True, exist_ok=True)

    def folder(self, name: str, seed: int) -> Path:
        return self.out / f"{name}-seed{seed}"

    def train(self, folder: Path, argv: list[str]) -> dict[str, Any]:
        """Train into ``folder`` with ``argv`` (``--output_dir`` added), or reuse the folder's finished run of
        exactly these arguments, config file contents and teacher weights (:func:`mmkd.args.run_inputs`); a
        finished run of anything else is deleted first. Returns the recipe's training summary."""
        from mmkd.args import import_script, run_inputs

        argv = [*argv, "--output_dir", str(folder)]
        wanted = {"argv": argv, "inputs": run_inputs(argv)}  # the arguments, the YAML's content, the teacher
        record = folder / RUN_RECORD
        if record.is_file():
            if json.loads(record.read_text()) == wanted:
                return json.loads((folder / "training_summary.json").read_text())
            shutil.rmtree(folder)  # a finished run of other arguments: its checkpoints must not be resumed
        print(f"[study] {folder.name}", flush=True)
        (folder / EVAL_RECORD).unlink(missing_ok=True)  # figures of earlier weights
        summary = import_script(self.recipe).main(argv)
        record.write_text(json.dumps(wanted, indent=2) + "\n")  # written last: the run is complete
        return summary

    def evaluate(self, folder: Path) -> dict[str, Any]:
        """Zero-shot acc@1 / acc@5 of the student in ``folder`` and its training seconds per step; kept in the
        folder (``study_eval.json``) and reused while the weights, the test set and the templates are the same."""
        from mmkd.eval.zeroshot import evaluate_zeroshot

        weights = sorted(Path(folder).glob("*.safetensors"))
        key = {"test": getattr(self.test, "name", None), "images": len(self.test), "templates": self.templates,
               "weights": [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]}
        record = Path(folder) / EVAL_RECORD
        if record.is_file():
            stored = json.loads(record.read_text())
            if stored.get("key") == json.loads(json.dumps(key)):
                return stored["result"]
        result = evaluate_zeroshot(str(folder), self.test, templates=self.templates, progress=False)
        row = {"acc1": result["acc1"], "acc5": result["acc5"], "seconds_per_step": seconds_per_step(folder)}
        record.write_text(json.dumps({"key": key, "result": row}, indent=2) + "\n")
        return row

    def run(self, name: str, argv: list[str], seed: int) -> dict[str, Any]:
        """Train (or reuse) run ``name`` at ``seed`` and evaluate it: ``{"seed", "folder", "acc1", "acc5",
        "seconds_per_step", "parameters"}``."""
        folder = self.folder(name, seed)
        summary = self.train(folder, [*argv, "--seed", str(seed)])
        return {"seed": seed, "folder": str(folder), **self.evaluate(folder),
                "parameters": summary["student"]["parameters"]["total"]}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several seeds of one configuration as one row: mean acc@1 / acc@5 / s per step, the acc@1 standard
    deviation (``None`` for one seed) and the per-seed acc@1."""
    acc1 = [r["acc1"] for r in runs]
    return {"seeds": [r["seed"] for r in runs], "acc1": statistics.mean(acc1),
            "acc1_sd": statistics.stdev(acc1) if len(acc1) > 1 else None, "acc1_per_seed": acc1,
            "acc5": statistics.mean(r["acc5"] for r in runs),
            "seconds_per_step": statistics.mean(r["seconds_per_step"] for r in runs),
            **({"parameters": runs[0]["parameters"]} if "parameters" in runs[0] else {})}


def close_pairs(rows: dict[str, dict[str, Any]], pairs: Sequence[tuple[str, str]], within: float = 0.01
                ) -> set[str]:
    """The rows of the compared ``pairs`` whose acc@1 differ by less than ``within`` (1 point): they need more
    seeds before the comparison says anything."""
    close = set()
    for a, b in pairs:
        if a in rows and b in rows and abs(rows[a]["acc1"] - rows[b]["acc1"]) < within:
            close |= {a, b}
    return close
