# Every target runs inside .venv; `make install` creates it (idempotent).
PYTHON ?= python3
VENV ?= .venv
# Extra `python -m venv` flags: --system-site-packages reuses a torch/torch_npu you installed yourself.
VENV_ARGS ?=
# Installed only when the venv has no torch yet (this is the CPU build on the dev machines).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python

CKPT ?=
TP ?= 2
OUT ?= shards

# Options of `python -m engine.demo`, e.g. DEMO_ARGS="--model tiny" (seconds) or "--device npu".
DEMO_ARGS ?=

# `make bench`: the scaling study (python -m engine.tools.bench_study, about 7 min here); shorter, e.g.
# make bench BATCHES="1 4" DTYPES=fp32. auto: the faster of fp32 and bf16 on this CPU (measured at load). BENCH_ARGS: more options, e.g. "--repeats 2" (keep the fastest of two
# runs: for a shared machine) or "--reference-threads 2" (also tp 1 on both cores).
TPS ?= 1 2
BATCHES ?= 1 4 8
DTYPES ?= auto int8
BENCH_ITERS ?= 3
BENCH_ARGS ?=

# `make gpu-check`: the prepared GPU check on this machine's GPUs (launch/gpu_check.sh; README §GPU check), about
# 8 minutes; WHEELS=dir installs what the machine lacks from a wheel folder, GPU_CHECK_ARGS more options
# ("--device cpu --quick": the dry run on a CPU).
WHEELS ?=
GPU_CHECK_ARGS ?=

.PHONY: install test shard verify clean demo bench serve bench-serve bench-ray-serve gpu-check

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[serve,ray,test,bench,index]"
	touch $@

demo: install
	$(PY) -m engine.demo $(DEMO_ARGS)

# The demo's random VLMo-base 480 behind engine.serve at tp 2 on http://127.0.0.1:8000 (Ctrl-C stops it).
serve: install
	$(PY) -m engine.demo --serve $(DEMO_ARGS)

# engine.serve under load: overhead vs engine.bench, dynamic batching vs batch 1, latency vs rate (bench/serve/).
BENCH_SERVE_ARGS ?=
bench-serve: install
	$(PY) -m engine.tools.bench_serve $(BENCH_SERVE_ARGS)

# engine.ray_serve against engine.serve on the same shards: the per-request overhead of Ray Serve.
BENCH_RAY_SERVE_ARGS ?=
bench-ray-serve: install
	$(PY) -m engine.tools.bench_ray_serve $(BENCH_RAY_SERVE_ARGS)

gpu-check:
	WHEELS="$(WHEELS)" launch/gpu_check.sh $(GPU_CHECK_ARGS)

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m engine.tools.bench_study --tps "$(TPS)" --batches "$(BATCHES)" --dtypes "$(DTYPES)" --iters $(BENCH_ITERS) $(BENCH_ARGS)

shard: install
	@test -n "$(CKPT)" || { echo "usage: make shard CKPT=path.pt TP=2 OUT=shards/" >&2; exit 2; }
	$(PY) -m sharding --checkpoint "$(CKPT)" --tp $(TP) --out "$(OUT)" $(SHARD_ARGS)

verify: install
	$(PY) -m sharding.verify "$(OUT)"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
