"""How mmkd survives what kills long runs, counted: kills, bad items, bad configuration.

1. **Kills**: the smoke recipe (tiny random teacher, 8 steps, a checkpoint every 2) is killed with SIGKILL, then
   resumed with ``--resume_from_checkpoint latest`` in a fresh process; a kill is survived when the resumed run ends
   with exactly the weights of an uninterrupted run (max abs difference 0). Half the kills land inside a checkpoint
   write (``tests/kill_mid_save_script.py`` stalls the save after the optimizer is written), half at a random time
   after a checkpoint appeared.
2. **Bad items**: 1 % of the rows of each source are made bad (truncated JPEG, zero-byte file, a text file named
   .jpg, a missing file, a caption that is not text) and the source's own summary count is compared with what was
   planted: a ``save_to_disk`` folder, Conceptual Captions as TSV + image folder and as webdataset shards, COCO.
3. **Bad configuration**: every bad value of ``tests/test_config_errors.py`` through the recipes' ``main``:
   refused cleanly = exit status 2, one stderr line starting ``error:`` holding the test's expected text (which
   names the option), no token echoed, no model loaded.

    python benchmarks/reliability.py --kills 6 --output reliability.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests package: its planted-data builders and the table of bad values

SMOKE = REPO / "recipes" / "configs" / "smoke.yaml"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def run_argv(out: Path, steps: int = 8) -> list[str]:
    return ["--config", str(SMOKE), "--output_dir", str(out), "--num_generated_examples", "64",
            "--per_device_train_batch_size", "8", "--max_steps", str(steps), "--save_steps", "2",
            "--save_total_limit", "3", "--report_to", "none", "--use_cpu", "true", "--dataloader_num_workers", "0"]


def recipe(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return max((x[k] - y[k]).abs().max().item() for k in x) if x.keys() == y.keys() else float("inf")


def kills(n: int, work: Path, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    reference = work / "reference"
    assert recipe("recipes/clip_student.py", *run_argv(reference)).wait() == 0
    trials = []
    for t in range(n):
        out, marker = work / f"kill{t}", work / f"marker{t}"
        mode = "mid-save" if t % 2 == 0 else "random"
        if mode == "mid-save":
            step = (2, 4, 6)[(t // 2) % 3]  # each checkpoint in turn
            proc = recipe("tests/kill_mid_save_script.py", str(marker), str(step), *run_argv(out))
            while not marker.exists() and proc.poll() is None:
                time.sleep(0.1)
            where = f"inside the save of checkpoint-{step}"
        else:
            proc = recipe("recipes/clip_student.py", *run_argv(out))
            after = (2, 4, 6)[(t // 2) % 3]
            while not (out / f"checkpoint-{after}").exists() and proc.poll() is None:
                time.sleep(0.05)
            delay = rng.uniform(0.0, 1.5)
            time.sleep(delay)
            where = f"{delay:.2f} s after checkpoint-{after} appeared"
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        resumed = recipe("recipes/clip_student.py", *run_argv(out), "--resume_from_checkpoint", "latest")
        ok = resumed.wait() == 0
        diff = max_diff(out / "model.safetensors", reference / "model.safetensors") if ok else float("inf")
        trials.append({"mode": mode, "where": where, "killed": proc.returncode == -signal.SIGKILL,
                       "resumed": ok, "max_abs_diff": diff,
                       "survived": proc.returncode == -signal.SIGKILL and ok and diff == 0.0})  # a real kill only
        print(f"kill {t}: {where}: resumed={ok}, max abs diff {diff}", flush=True)
    return trials


# -- bad items ---------------------------------------------------------------------------------------------------
def _jpeg(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i % 250, 60, 120)).save(buf, format="JPEG")
    return buf.getvalue()


BAD_BYTES = {"truncated JPEG": lambda i: _jpeg(i)[:150], "zero-byte file": lambda i: b"",
             "text file named .jpg": lambda i: b"just some text"}


def _summary_count(text: str) -> int:
    m = re.search(r"skipped ([\d,]+) of", text)
    return int(m.group(1).replace(",", "")) if m else 0


@contextlib.contextmanager
def _captured(logger: str):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log = logging.getLogger(logger)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        log.removeHandler(handler)


def bad_items(work: Path) -> list[dict]:
    import datasets

    from mmkd.data.baddata import drop_bad_rows
    from mmkd.data.conceptual_captions import load_conceptual_captions

    rows = []
    # save_to_disk folder: 500 rows, 5 bad (the embedded files: no missing path survives save_to_disk)
    from tests.test_bad_items import bad_folder

    with _captured("mmkd.data.baddata") as log:
        drop_bad_rows(datasets.load_from_disk(str(bad_folder(work / "folder"))), "image", "text", what="folder")
    rows.append({"source": "save_to_disk folder (Image column over paths)", "planted": 5,
                 "skipped": _summary_count(log.getvalue())})

    # Conceptual Captions, TSV + image folder and webdataset shards: 1,000 rows, 10 bad
    n, bad = 1000, {i: kind for i, kind in zip(range(7, 1000, 100), [*BAD_BYTES, "missing file", "empty caption"] * 2,
                                               strict=False)}
    cc = work / "cc"
    (cc / "images").mkdir(parents=True)
    lines = ["caption\turl"]
    for i in range(n):
        kind = bad.get(i)
        lines.append(f"{'' if kind == 'empty caption' else f'picture {i}'}\thttps://example.com/{i}.jpg")
        if kind != "missing file":
            (cc / "images" / f"{i}.jpg").write_bytes(BAD_BYTES[kind](i) if kind in BAD_BYTES else _jpeg(i))
    (cc / "cc.tsv").write_text("\n".join(lines) + "\n")
    with _captured("mmkd.data") as log:
        load_conceptual_captions(cc / "cc.tsv", image_dir=cc / "images", cache_dir=cc / "arrow")
    # an empty caption is a malformed TSV row; a missing file is a dead URL, counted apart from the offenders
    rows.append({"source": "Conceptual Captions, TSV + image folder", "planted": len(bad),
                 "skipped": _summary_count(log.getvalue())})
    shards = cc / "shards"
    shards.mkdir()
    for s in range(n // 100):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i in range(s * 100, (s + 1) * 100):
                kind, key = bad.get(i), f"{i:09d}"
                members = {"txt": b"" if kind == "empty caption" else f"picture {i}".encode()}
                if kind != "missing file":
                    members["jpg"] = BAD_BYTES[kind](i) if kind in BAD_BYTES else _jpeg(i)
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    with _captured("mmkd.data") as log:
        load_conceptual_captions(shards=str(shards), cache_dir=cc / "arrow-wds")
    rows.append({"source": "Conceptual Captions, webdataset shards", "planted": len(bad),
                 "skipped": _summary_count(log.getvalue())})

    # COCO: 200 images, 2 bad files (truncated, zero-byte): 1 %
    from mmkd.data.coco import build_coco_matching

    coco = work / "coco"
    (coco / "val2017").mkdir(parents=True)
    images, anns = [], []
    for i in range(200):
        images.append({"id": i, "file_name": f"{i:06d}.jpg"})
        anns.append({"id": 1000 + i, "image_id": i, "caption": f"a picture of thing {i}"})
        data = _jpeg(i)[:150] if i == 50 else (b"" if i == 150 else _jpeg(i))
        (coco / "val2017" / f"{i:06d}.jpg").write_bytes(data)
    (coco / "captions_val2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    ds = build_coco_matching(annotations={"validation": coco / "captions_val2017.json"},
                             images={"validation": coco / "val2017"})["validation"]
    rows.append({"source": "COCO captions (default check)", "planted": 2,
                 "skipped": _summary_count(ds.info.description)})
    return rows


# -- bad configuration -------------------------------------------------------------------------------------------
def bad_configs(work: Path) -> list[dict]:
    import pytest

    import tests.test_config_errors as table
    from tests.conftest import load_recipe

    def where(i: int) -> Path:
        (work / str(i)).mkdir(parents=True, exist_ok=True)
        return work / str(i)

    table_rows = [("clip_student", table.clip_argv, extra, expected) for extra, expected in table.CLIP_CASES]
    table_rows += [("clip_student", table.clip_argv, ["--push_to_hub", "true", "--hub_token", table.FAKE_TOKEN],
                    "hub_token")]
    table_rows += [("match_student", table.match_argv, extra, expected) for extra, expected in table.MATCH_CASES]
    table_rows += [("offline_job", table.offline_argv, extra, expected) for extra, expected in table.OFFLINE_CASES]
    cases = [(script, argv_of(where(i), *extra), expected) for i, (script, argv_of, extra, expected) in
             enumerate(table_rows)]
    cases += [("clip_student", table.yaml_with(where(len(cases) + i), y), expected)
              for i, (y, expected) in enumerate(table.YAML_CASES)]
    results = []
    with pytest.MonkeyPatch.context() as mp:
        table.block_model_loading(mp)
        for script, argv, expected in cases:
            module, err = load_recipe(script), io.StringIO()
            code, loaded = None, False
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    module.main(argv)
                except SystemExit as exit_:
                    code = exit_.code
                except AssertionError:
                    loaded = True  # the no-model-loading guard fired
            lines = err.getvalue().strip().splitlines()
            leaked = table.FAKE_TOKEN in err.getvalue()
            clean = (code == 2 and not loaded and not leaked and len(lines) == 1 and lines[0].startswith("error:")
                     and expected in lines[0])  # the test's criterion: its expected text, naming the option
            results.append({"recipe": script, "expected": expected, "exit": code, "line": lines[-1] if lines else "",
                            "clean": clean})
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=6)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mmkd-reliability-") as tmp:
        work = Path(tmp)
        report = {"kills": kills(args.kills, work / "kills"), "bad_items": bad_items(work / "items"),
                  "bad_configs": bad_configs(work / "configs")}
    k, b, c = report["kills"], report["bad_items"], report["bad_configs"]
    mid = [t for t in k if t["mode"] == "mid-save"]
    print("\n| what | result |\n|---|---|")
    print(f"| kills survived / tried | {sum(t['survived'] for t in k)} / {len(k)} "
          f"(mid-save {sum(t['survived'] for t in mid)} / {len(mid)}) |")
    for row in b:
        print(f"| bad items skipped / planted: {row['source']} | {row['skipped']} / {row['planted']} |")
    print(f"| bad config values refused cleanly / tried | {sum(r['clean'] for r in c)} / {len(c)} |")
    for r in c:
        if not r["clean"]:
            print(f"  not clean: {r['recipe']} {r['expected']!r}: exit {r['exit']}, {r['line']!r}")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
