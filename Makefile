# Two entry points a new machine needs: `make run` (set up, then a demo cluster answers a request)
# and `make test` (set up, then the whole suite). Everything else is a helper target; `make
# test-fast` is the edit loop's: the suite without the tests marked slow, in about a minute.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# pip resumes a download cut off mid-file, and each install is tried again before set-up gives up.
INSTALL := scripts/with-retries 3 $(PIP) install -q --retries 10
DEMO_MODEL ?= .cache/models/tiny-v3

.PHONY: setup run test test-fast protos bench demo-model clean

setup: $(STAMP)

# torch first and pinned: pip takes the CPU wheel on this machine's disk; an open range would
# pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(INSTALL) --upgrade pip
	$(INSTALL) --resume-retries 20 torch==2.13.0
	$(INSTALL) --resume-retries 20 -e '.[test]'
	$(INSTALL) --resume-retries 20 -e '.[ucx]' \
	  || echo "set-up: ucxx could not be installed; shards serve gRPC only and the UCX tests are skipped" >&2
	touch $@

demo-model: setup
	$(PY) -m services.cli.demo_model $(DEMO_MODEL)

run: demo-model
	$(VENV)/bin/moe up --model $(DEMO_MODEL) --shards 2 --replicas 2 --attention-workers 2 --detach
	$(VENV)/bin/moe generate --endpoint 127.0.0.1:50050 --prompt-ids 1,2,3,4 --max-new-tokens 16 --ignore-eos; \
	  status=$$?; $(VENV)/bin/moe down; exit $$status

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

protos: setup
	PY=$(PY) scripts/gen-protos.sh

bench: setup
	$(PY) benchmarks/decode_bench.py

clean:
	rm -rf $(VENV) .cache .run
