# Two commands do all set-up on a fresh machine:
#   make demo   -- create .venv on first use, then run the main job
#   make test   -- create .venv on first use, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmkd-installed

.PHONY: demo smoke test test-slow lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
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
