# circuitexplain: two commands on a fresh machine
#   make demo   create .venv, install, run the main job on the default zoo model
#   make test   install the test extras and run the test suite
# Override TORCH on a GPU machine (e.g. make demo TORCH=torch) : the default is the CPU wheel.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
CE     := $(VENV)/bin/circuitexplain
TORCH  ?= torch==2.13.0
MODEL  ?= ioi-2l
OUT    ?= out
PYTEST_ARGS ?=
SAELENS_VENV ?= .venv-saelens
AUTOCIRCUIT_VENV ?= .venv-autocircuit

.PHONY: demo test install install-test lint bench clean vllm-venv saelens-env autocircuit-env

$(VENV)/.base:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	touch $@

$(VENV)/.installed: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e '.[test,tracr,embed]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MODEL=$(MODEL) OUT=$(OUT) CE=$(CE) PY=$(PY) bash scripts/demo.sh

# SAELens pins TransformerLens < 4: its cross-load test runs it from a venv of its own
$(SAELENS_VENV)/.installed: scripts/saelens_env.sh
	bash scripts/saelens_env.sh $(SAELENS_VENV)

saelens-env: $(SAELENS_VENV)/.installed

# auto-circuit (external EAP reference) needs TransformerLens 2.x: a venv of its own (scripts/compare_eap_external.py)
$(AUTOCIRCUIT_VENV)/.installed: scripts/autocircuit_env.sh
	bash scripts/autocircuit_env.sh $(AUTOCIRCUIT_VENV)

autocircuit-env: $(AUTOCIRCUIT_VENV)/.installed

test: install-test saelens-env vllm-venv autocircuit-env
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# vLLM (CPU) in a venv of its own for `circuitexplain llm serve` and the real-server tests (about 100 s)
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: scripts/build_vllm_venv.sh
	bash scripts/build_vllm_venv.sh $(VLLM_VENV)

vllm-venv: $(VLLM_VENV)/.installed

lint: install-test
	$(VENV)/bin/ruff check patching circuits graphs explainers evals tests scripts

bench: install
	$(CE) bench patching --model ioi-2l --out $(OUT)/bench-ioi-2l.json
	$(CE) bench patching --model greater-than-2l --out $(OUT)/bench-greater-than-2l.json

clean:
	rm -rf $(VENV) $(SAELENS_VENV) $(AUTOCIRCUIT_VENV) $(OUT) *.egg-info
