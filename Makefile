# Two commands do all set-up on a fresh machine:
#   make demo   -- create .venv on first use, then run the main job
#   make test   -- create .venv on first use, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmkd-installed

.PHONY: demo study features kd-grid kd-affinity kd-assistants kd-teacher-free kd-data-fraction kd-studies smoke test \
	test-slow lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,bench,onnx]'
	@# DeepSpeed (optional extra, for the ZeRO configs' tests) ships as a source package whose setup imports torch
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation -c constraints.txt 'deepspeed>=0.19'
	@# The demo and the slow tests read Fashion-MNIST (the real images available offline) from the Debian
	@# package's IDX files (mmkd/data/fashion_mnist.py); install it when missing and we can, never fail on it.
	@if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
		&& [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
			|| echo "could not install dataset-fashion-mnist (Fashion-MNIST will come from data_dir= or the Hub)"; \
	fi
	touch $(STAMP)

# The offline main job: teacher from scratch, distilled student, from-scratch baseline, evaluation, results table.
demo: $(STAMP)
	$(VENV)/bin/accelerate launch --num_processes 1 recipes/offline_job.py \
		--config recipes/configs/offline_job.yaml

# A second command, after `make demo` (it reuses the demo's teacher): a narrow 3+3-layer, width-96 student distilled
# from it, its from-scratch twin (same shape, random init, the demo's scratch recipe), and the compression report
# with magnitude and structured pruning of the teacher. About 5 minutes on 2 CPU cores.
NARROW := --student_vision_layers 3 --student_text_layers 3 --student_vision_width 96 --student_text_width 96
study: $(STAMP)
	test -f out/offline/teacher/config.json || { echo "run make demo first (the study reuses its teacher)" >&2; exit 2; }
	$(VENV)/bin/accelerate launch --num_processes 1 recipes/clip_student.py \
		--config recipes/configs/fashion_mnist_student.yaml --teacher_name_or_path out/offline/teacher \
		$(NARROW) --output_dir out/study/narrow
	$(VENV)/bin/accelerate launch --num_processes 1 recipes/clip_student.py \
		--config recipes/configs/fashion_mnist_student.yaml --teacher_name_or_path out/offline/teacher \
		$(NARROW) --student_init random --triplet_weight 0 --image_distill_weight 0 --text_distill_weight 0 \
		--contrastive_weight 1.0 --affinity_weight 0 --learning_rate 0.001 --output_dir out/study/narrow-scratch
	$(VENV)/bin/mmkd report --teacher out/offline/teacher --student out/offline/distilled \
		--student out/study/narrow --student out/study/narrow-scratch \
		--prune magnitude:0.3,0.5,0.7 --prune structured:0.5 --dataset fashion_mnist \
		--plot out/study/report.png --json out/study/report.json --markdown out/study/report.md

# The feature-distillation ablation (after `make demo`): half-depth and narrow students with output terms only,
# FitNets hints, attention transfer and SimKD, plus two more seeds for the deciding rows. About 30 minutes.
features: $(STAMP)
	test -f out/offline/teacher/config.json || { echo "run make demo first (the study reuses its teacher)" >&2; exit 2; }
	$(PY) recipes/feature_study.py --teacher out/offline/teacher --output_dir out/features

# Research 001 on CLIP students (after `make demo`): Hinton KD on zero-shot class logits (α × T grid), CLIP-KD's
# affinity weight × temperature, teacher assistants, teacher-free KD and the data-fraction curve
# (recipes/kd_studies.py; each writes out/kd/<study>.md / .json / .png; runs are shared between studies).
NEED_TEACHER = test -f out/offline/teacher/config.json || { echo "run make demo first (the study reuses its teacher)" >&2; exit 2; }
kd-grid: $(STAMP)
	@$(NEED_TEACHER)
	$(PY) recipes/kd_studies.py grid --term class_kd
kd-affinity: $(STAMP)
	@$(NEED_TEACHER)
	$(PY) recipes/kd_studies.py grid --term affinity
kd-assistants: $(STAMP)
	@$(NEED_TEACHER)
	$(PY) recipes/kd_studies.py assistants
kd-teacher-free: $(STAMP)
	@$(NEED_TEACHER)
	$(PY) recipes/kd_studies.py teacher-free
kd-data-fraction: $(STAMP)
	@$(NEED_TEACHER)
	$(PY) recipes/kd_studies.py data-fraction
kd-studies: kd-grid kd-affinity kd-assistants kd-teacher-free kd-data-fraction

smoke: $(STAMP)
	$(VENV)/bin/accelerate launch --num_processes 1 recipes/clip_student.py \
		--config recipes/configs/smoke.yaml --output_dir out/smoke

# pytest exits 5 when it collects no tests: that is a failure here, never a green run.
test: $(STAMP)
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check mmkd recipes tests benchmarks

clean:
	rm -rf out .pytest_cache
