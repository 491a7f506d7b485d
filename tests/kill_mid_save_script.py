"""Run ``recipes/clip_student.py`` and stall inside the save of one checkpoint, so a test can ``kill -9`` it there.

    python tests/kill_mid_save_script.py MARKER STEP RECIPE_ARGS...

At step ``STEP`` the save has written the weights and the optimizer and scheduler but not yet the RNG states and
the trainer state: the script writes the checkpoint's path to ``MARKER`` and sleeps, and the test kills it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mmkd.args import import_script
from mmkd.trainers import CLIPDistillationTrainer

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    marker, stall_step, recipe_args = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    save = CLIPDistillationTrainer._save_optimizer_and_scheduler

    def stalling_save(self, output_dir):
        save(self, output_dir)
        if self.state.global_step == stall_step:
            marker.write_text(str(output_dir))
            time.sleep(600)

    CLIPDistillationTrainer._save_optimizer_and_scheduler = stalling_save
    import_script(REPO / "recipes" / "clip_student.py").main(recipe_args)
