# One target per developer action. `make help` lists them.

PYTHON ?= python3
CARGO ?= cargo
QKDSERVER ?= qkdserver

.DEFAULT_GOAL := help
.PHONY: help install run test test-rust test-python lint fmt bench
.PHONY: build base-image default restart stop exec watchdog logs test-docker
.PHONY: generate-config check-config certs qkd-status keygen-status keygen-start keygen-stop
.PHONY: savelog build-fresh

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

install:  ## build qkd_core (release) and install it with S15qkd and the test tools
	$(PYTHON) -m pip install --quiet 'maturin>=1.7,<2' 'pytest>=7' 'hypothesis>=6' 'numpy>=1.23'
	$(PYTHON) -m pip install --quiet --no-build-isolation '.[test,web]'

# Options of `make run`, e.g. SIMULATE_ARGS='--workdir /tmp/sim' to keep the keys.
SIMULATE_ARGS ?=

run: install  ## simulate a two-node link on this machine and check both keystores
	qkdserver simulate $(SIMULATE_ARGS)

test: install test-rust test-python  ## run every test: cargo tests, then pytest

test-rust:  ## cargo tests of the Rust core
	$(CARGO) test --workspace --exclude qkd-python

# Extra pytest options; PYTEST_OPTIONS="-m 'not slow'" skips the long fault tests
# (among them a 30 s channel cut), which CI runs.
PYTEST_OPTIONS ?=

test-python:  ## pytest against the installed packages (PYTEST_OPTIONS adds options)
	$(PYTHON) -m pytest $(PYTEST_OPTIONS) tests

lint:  ## rustfmt and clippy, warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:  ## format the Rust code
	$(CARGO) fmt --all

bench:  ## criterion benchmarks of the hot paths; see docs/benchmarks.md
	$(CARGO) bench --workspace --exclude qkd-python

# --- Node set-up and control, the reference deployment's verbs ---------------------------
# NAME of the node whose key and certificate `make certs` creates in SECRETS_DIR.
NAME ?= high
# The node's web page, as the host sees it; with HTTPS, e.g. WEB_URL=https://localhost:8080
# CURL_OPTIONS='--cacert secrets/certs/cert.crt'.
WEB_URL ?= http://localhost:$(WEB_PORT)
CURL_OPTIONS ?=
# File with the node's web token. Empty: <data_root>/web_token inside container CONTAINER.
WEB_TOKEN_FILE ?=

generate-config:  ## write CONFIG_DIR/CONFIG_FILE: every key with its default and meaning; choose source.kind
	@mkdir -p $(CONFIG_DIR)
	@$(QKDSERVER) config --output $(CONFIG_DIR)/$(CONFIG_FILE)

check-config:  ## run the node's start-up checks on CONFIG_DIR/CONFIG_FILE, print the configuration
	@$(QKDSERVER) config --config $(CONFIG_DIR)/$(CONFIG_FILE)

certs:  ## create NAME.key and the self-signed NAME.crt in SECRETS_DIR (NAME=high)
	@$(QKDSERVER) certs $(NAME) --folder $(SECRETS_DIR)

qkd-status:  ## HTTP status of WEB_URL/status_qkd: 200 while costream or splicer runs
	@curl -sS $(CURL_OPTIONS) -o /dev/null -w 'status_qkd: %{http_code}\n' $(WEB_URL)/status_qkd

keygen-status:  ## key rate in bit/s of the last block while error correction runs, else 404
	@curl -sS $(CURL_OPTIONS) -w ' (status_keygen: %{http_code})\n' $(WEB_URL)/status_keygen

keygen-start:  ## start key generation on both nodes (needs the node's web token)
	@$(call web_control,start_keygen)

keygen-stop:  ## stop key generation on both nodes; the channel stays up
	@$(call web_control,stop_keygen)

# The token goes to curl on stdin, so it never shows in the process list.
define web_control
token=$$($(read_web_token)) || exit 1; \
printf 'Authorization: Bearer %s\n' "$$token" | \
	curl -sS $(CURL_OPTIONS) --fail-with-body -X POST -H @- $(WEB_URL)/$(1) && echo "$(1): done"
endef
define read_web_token
if [ -n '$(WEB_TOKEN_FILE)' ]; then cat '$(WEB_TOKEN_FILE)'; \
else root=$$($(container_data_root)) && $(DOCKER) exec $(CONTAINER) cat "$$root/web_token"; fi
endef
# data_root of the node in the container, read from its configuration.
container_data_root = $(DOCKER) exec $(CONTAINER) python -c 'import os; from S15qkd.config import load_config; print(load_config(os.environ["QKD_CONFIG"])["data_root"])'

# --- Container ------------------------------------------------------------------------
# The image and container names are the reference deployment's, so scripts and the key
# manager that address them keep working. Override any variable on the command line,
# e.g. `make default WEB_PORT=8000 CONFIG_DIR=/srv/qkd/config`.
DOCKER ?= docker
IMAGE ?= s-fifteen/qkdserver:qkd
BASE_IMAGE ?= python:3.11-slim-bookworm
OFFLINE_BASE_IMAGE ?= qkdserver-base:bookworm
CONTAINER ?= qkd
WEB_PORT ?= 8080
CHANNEL_PORT ?= 4853
CONFIG_DIR ?= $(CURDIR)/config
CONFIG_FILE ?= qkd_engine_config.yaml
SECRETS_DIR ?= $(CURDIR)/secrets
KEYS_VOLUME ?= epochs
DATA_VOLUME ?= qkddata
DEVICE ?= /dev/ttyACM0
# Options of `qkdserver node`: --start begins key generation whenever the peer connects.
NODE_ARGS ?= --start
# Empty: <data_root>/watchdog.log, with data_root read from the node's configuration.
WATCHDOG_LOG ?=
STOP_TIMEOUT ?= 30
# Folder of the archives that `make savelog` writes.
LOG_DIR ?= $(CURDIR)/logs
# Seconds of the node's console log that `make default` shows before it returns.
START_CHECK_SECONDS ?= 4
# DEV=1 mounts S15qkd/ and entrypoint.sh from this checkout over the installed ones, so a
# Python change needs no rebuild. The Rust extension stays the one built into the image.
DEV ?= 0
# The host's time zone, unless TZ is set.
TZ ?= $(shell cat /etc/timezone 2>/dev/null || echo UTC)

DOCKER_RUN_OPTIONS = --name $(CONTAINER) --rm -dit --init --entrypoint=/root/entrypoint.sh \
	--volume $(CONFIG_DIR):/etc/qkdserver \
	--volume $(SECRETS_DIR):/root/keys/authd \
	--volume $(KEYS_VOLUME):/epoch_files \
	--volume $(DATA_VOLUME):/tmp/cryptostuff \
	--env TZ=$(TZ) --env QKD_CONFIG=/etc/qkdserver/$(CONFIG_FILE) --env 'QKD_NODE_ARGS=$(NODE_ARGS)' \
	$(if $(filter 1,$(DEV)),--volume $(CURDIR)/S15qkd:/root/code/QKDServer/S15qkd:ro \
		--volume $(CURDIR)/entrypoint.sh:/root/entrypoint.sh:ro) \
	$(if $(wildcard $(DEVICE)),--device=$(DEVICE) --device-cgroup-rule='a *:* rwm') \
	-p $(WEB_PORT):8000 -p $(CHANNEL_PORT):4853

# Prerequisite checks: each prints what is missing and how to get it.
define require_docker
	@command -v $(DOCKER) >/dev/null || { echo "docker not found: install Docker Engine (Debian: apt-get install docker.io)"; exit 1; }
	@$(DOCKER) info >/dev/null 2>&1 || { echo "the Docker daemon does not answer: start it (systemctl start docker) or check DOCKER_HOST"; exit 1; }
endef
define require_image
	@$(DOCKER) image inspect $(IMAGE) >/dev/null 2>&1 || { echo "image $(IMAGE) not found: build it with 'make build'"; exit 1; }
endef
define require_container
	@[ "$$($(DOCKER) container inspect -f '{{.State.Running}}' $(CONTAINER) 2>/dev/null)" = true ] || { echo "container $(CONTAINER) is not running: start it with 'make default'"; exit 1; }
endef

build:  ## build the Docker image from wheels (offline base image if the pull fails)
	$(require_docker)
	IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) OFFLINE_BASE_IMAGE=$(OFFLINE_BASE_IMAGE) PYTHON=$(PYTHON) docker/build-image.sh

build-fresh:  ## build the Docker image without Docker's layer cache
	$(require_docker)
	IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) OFFLINE_BASE_IMAGE=$(OFFLINE_BASE_IMAGE) PYTHON=$(PYTHON) \
		DOCKER_BUILD_ARGS="--no-cache $(DOCKER_BUILD_ARGS)" docker/build-image.sh

base-image:  ## build the Debian base image offline with debootstrap
	$(require_docker)
	docker/build-base-image.sh $(OFFLINE_BASE_IMAGE)

default:  ## run the node in container qkd: web page on port 8080, channel on 4853, events from source.kind
	$(require_docker)
	$(require_image)
	@[ -f $(CONFIG_DIR)/$(CONFIG_FILE) ] || { echo "configuration $(CONFIG_DIR)/$(CONFIG_FILE) not found: write the node's site file there (see docs/container-run.rst), or set CONFIG_DIR and CONFIG_FILE"; exit 1; }
	@! $(DOCKER) container inspect $(CONTAINER) >/dev/null 2>&1 || { echo "container $(CONTAINER) already exists: 'make restart' replaces it, 'make stop' stops it"; exit 1; }
	@[ -d $(SECRETS_DIR) ] || { mkdir -m 700 -p $(SECRETS_DIR) && echo "created $(SECRETS_DIR) for the node's certificates, keys and web token"; }
	@[ -e $(DEVICE) ] || echo "no timestamp device at $(DEVICE): running without it (set DEVICE=... to pass another)"
	$(DOCKER) run $(DOCKER_RUN_OPTIONS) $(IMAGE)
	@# --rm deletes a container that exits, and its log with it. Showing the first seconds
	@# of the log keeps the reason of a node that rejects its configuration on the terminal.
	@timeout $(START_CHECK_SECONDS) $(DOCKER) logs --follow $(CONTAINER) 2>&1 || true
	@[ "$$($(DOCKER) container inspect -f '{{.State.Running}}' $(CONTAINER) 2>/dev/null)" = true ] || { echo "container $(CONTAINER) stopped during start-up: fix the error above, then run 'make default' again"; exit 1; }

restart:  ## stop the container, then start it again as 'make default' does
	$(require_docker)
	$(MAKE) --no-print-directory stop
	$(MAKE) --no-print-directory default

stop:  ## stop the container; the node finishes the key it is writing first
	$(require_docker)
	@if $(DOCKER) container inspect $(CONTAINER) >/dev/null 2>&1; then \
		$(DOCKER) stop --time $(STOP_TIMEOUT) $(CONTAINER) >/dev/null; \
		$(DOCKER) rm --force $(CONTAINER) >/dev/null 2>&1 || true; \
		while $(DOCKER) container inspect $(CONTAINER) >/dev/null 2>&1; do sleep 0.5; done; \
		echo "stopped $(CONTAINER)"; \
	else \
		echo "container $(CONTAINER) is not running"; \
	fi

exec:  ## open a shell inside the running container
	$(require_docker)
	$(require_container)
	$(DOCKER) exec -it $(CONTAINER) /bin/bash

watchdog:  ## follow the watchdog log of the running node
	$(require_docker)
	$(require_container)
	@log='$(WATCHDOG_LOG)'; \
	if [ -z "$$log" ]; then \
		log=$$($(container_data_root) 2>/dev/null)/watchdog.log || exit 1; \
	fi; \
	$(DOCKER) exec $(CONTAINER) test -e "$$log" || echo "no watchdog log at $$log yet; waiting for the node to write it"; \
	echo "$(DOCKER) exec $(CONTAINER) tail -n 100 -F $$log"; \
	$(DOCKER) exec $(CONTAINER) tail -n 100 -F "$$log"

savelog:  ## archive the console and watchdog logs as a .tar.gz in LOG_DIR (no key material)
	$(require_docker)
	$(require_container)
	@name=$$(date +%Y%m%d_%H%M%S)_qkdlog_$$(hostname); folder='$(LOG_DIR)'/$$name; \
	mkdir -p "$$folder" && \
	$(DOCKER) logs $(CONTAINER) > "$$folder/console.log" 2>&1 && \
	root=$$($(container_data_root)) && \
	$(DOCKER) cp $(CONTAINER):"$$root/watchdog.log" "$$folder/watchdog.log" && \
	tar -czf "$$folder.tar.gz" -C '$(LOG_DIR)' "$$name" && rm -r "$$folder" && \
	echo "saved $$folder.tar.gz"

logs:  ## follow the node's console log (docker logs)
	$(require_docker)
	@$(DOCKER) container inspect $(CONTAINER) >/dev/null 2>&1 || { echo "container $(CONTAINER) not found: start it with 'make default'"; exit 1; }
	$(DOCKER) logs --follow $(CONTAINER)

test-docker: build  ## build the image, then test it: entrypoint, web page, two nodes on a private network
	QKD_DOCKER_IMAGE=$(IMAGE) $(PYTHON) -m pytest tests/test_container.py
