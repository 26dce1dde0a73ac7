# kvmrkt: `make run` (set up everything, then run a demo pod in a VM) and `make test` (set up, then the whole
# test suite). Both are meant to be run as root on a fresh Debian 12 machine.
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c

VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
KVMRKT := $(VENV)/bin/kvmrkt
DEMO_DIR := /var/tmp/kvmrkt-demo
DEBS := qemu-system-x86 busybox-static erofs-utils umoci skopeo swtpm swtpm-tools docker-registry appc-spec apache2-utils \
	linux-source-6.1 bc flex bison libelf-dev libssl-dev gcc make libc6-dev cpio xz-utils \
	libtss2-dev libvirt-dev pkg-config python3 python3-venv python3-dev cryptsetup-bin tpm2-tools \
	libvirt-daemon-system libvirt-clients libxml2-utils containernetworking-plugins iproute2 iptables \
	containerd runc podman golang-github-opencontainers-specs-dev golang-go

.PHONY: setup debs venv assets gotools run test unit integration lint bench clean

setup: debs venv assets gotools

debs:
	@if [ "$$(id -u)" != 0 ]; then echo "make setup needs root (it installs Debian packages)"; exit 1; fi
	@missing=$$(dpkg-query -W -f='$${Package} $${Status}\n' $(DEBS) 2>/dev/null | grep -v ' installed$$' | cut -d' ' -f1; \
	  for p in $(DEBS); do dpkg-query -W $$p >/dev/null 2>&1 || echo $$p; done)
	if [ -n "$$missing" ]; then
	  echo "installing Debian packages: $$missing"
	  apt-get update -q
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBS)
	fi

venv: $(VENV)/.installed
	ln -sf $(KVMRKT) /usr/local/bin/kvmrkt
	ln -sf $(VENV)/bin/kvmrkt-oci /usr/local/bin/kvmrkt-oci

$(VENV)/.installed: pyproject.toml
	/usr/bin/python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,libvirt]'
	touch $@

# Both guest kernels: the minimal one (default; built once per machine, cached) and Debian's cloud kernel.
assets: debs venv
	$(KVMRKT) stage1 build --kernel=minimal
	$(KVMRKT) stage1 build --kernel=debian-cloud

# crictl and the runtime-tools OCI validation suite, built from tests/vendor (or $$KVMRKT_VENDOR_DIR) with
# Debian's Go, offline; cached under /var/cache/kvmrkt-test/<tarball sha256>/ (minutes the first time, then nothing).
gotools: debs venv
	$(PY) tests/tools/build_go_tools.py

run: setup
	@echo "== kvmrkt demo: every command below can be repeated by hand (kvmrkt is in /usr/local/bin) =="
	examples/demo-tpm.sh /etc/kvmrkt
	examples/busybox-image.sh $(DEMO_DIR)/busybox-oci latest
	examples/sign-image.sh $(DEMO_DIR)/busybox-oci demo/busybox:latest $(DEMO_DIR)/gnupg $(DEMO_DIR)/demo-key.asc
	@set -x
	kvmrkt trust --prefix demo $(DEMO_DIR)/demo-key.asc
	kvmrkt image import oci:$(DEMO_DIR)/busybox-oci:latest --name demo/busybox
	kvmrkt policy explain demo/busybox
	kvmrkt image list
	kvmrkt run --uuid-file-save $(DEMO_DIR)/uuid demo/busybox --exec /bin/sh -- -c \
	  'echo "hello from app $$AC_APP_NAME on $$(hostname), kernel $$(uname -r), $$(nproc) vCPU"; \
	   echo "root filesystem: $$(grep " / " /proc/mounts)"'
	kvmrkt status $$(cat $(DEMO_DIR)/uuid)
	kvmrkt stage1 template build
	time kvmrkt run demo/busybox --exec /bin/sh -- -c 'echo "hello again, from a VM restored from a template"'
	kvmrkt attest log | tail -n 6
	kvmrkt list
	kvmrkt gc --grace-period=0s

lint: venv
	$(VENV)/bin/ruff check kvmrkt stage1_kvm measure policy tests bench
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest -q tests/unit tests/engine

integration: setup
	$(PY) -m pytest -q tests/integration --require-capabilities

test: setup lint
	$(PY) -m pytest tests --require-capabilities

bench: setup
	$(PY) bench/boot.py
	$(PY) bench/boot.py --kernel debian-cloud
	$(PY) bench/kernel_boot.py --profile
	$(PY) bench/images.py
	$(PY) bench/measured_launch.py
	$(PY) bench/net.py
	$(PY) bench/oci.py
	$(PY) bench/launch_profile.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
