# The two commands a new user needs: `make run` and `make test`. Both install what is missing
# first (boot/setup.sh). Everything else goes through `cargo xtask` (see README.md).
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: setup run test check image bench fuzz soak kut kut-svm linux

setup:
	@boot/setup.sh

## Boot the hypervisor in Bochs (VT-x + EPT), run the demo guest, print page statistics.
run: setup
	cargo xtask run

## Lints, host tests, and on each backend (VMX in Bochs, SVM in QEMU's TCG) the in-kernel tests,
## a subset of kvm-unit-tests and the Linux boot inside the hypervisor; ends with
## `N passed, N failed`.
test: setup check
	cargo xtask test

## Formatting and clippy for the host crates, pgm on each nested format (and its docs, warnings
## denied), and the kernel's four variants (demo and tests, VMX and SVM; each is its own cargo
## invocation: building host and bare-metal crates together would unify their features).
check: setup
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy -p pgm --all-targets --features sim -- -D warnings
	cargo clippy -p pgm --all-targets --features sim-npt -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc -p pgm --no-deps --features sim
	cd kernel && cargo clippy --all-targets -- -D warnings
	cd kernel && cargo clippy --all-targets --features kernel-tests -- -D warnings
	cd kernel && cargo clippy --all-targets --features svm -- -D warnings
	cd kernel && cargo clippy --all-targets --features svm,kernel-tests -- -D warnings

## The benchmarks (figures in pgm/README.md): pgm at scale against rust-vmm's vm-memory on a flat
## direct-mapped host memory (one table, pgm/README.md's), and write-monitor faults from 1 and 2
## threads (criterion).
bench: setup
	cargo bench -p pgm --features sim --bench scale
	cargo bench -p pgm --features sim --bench write_monitor_threads

## BIOS and UEFI disk images of the demo kernel.
image: setup
	cargo xtask image

## The three fuzz targets (cargo fuzz, libFuzzer), FUZZ_SECONDS each (default 60): the whole pgm
## API with the auditor as oracle (on EPT tables, then on NPT ones), the instruction emulator against a fake device, and the
## virtual PC's devices under random port, MMIO and MSR sequences. Both
## crates are safe Rust, so no sanitizer; the pgm target is built without debug assertions
## (its oracle is the audit after every step) and without compare tracing (its bytes pick
## operations modulo their count, so comparisons guide nothing), which makes it 3x faster.
FUZZ_SECONDS ?= 60
fuzz: setup
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	cd pgm && cargo fuzz run -s none -O --no-trace-compares api -- -max_total_time=$(FUZZ_SECONDS) -max_len=512
	cd pgm && cargo fuzz run -s none -O --no-trace-compares --features npt api -- -max_total_time=$(FUZZ_SECONDS) -max_len=512
	cd kernel/emulator && cargo fuzz run -s none instructions -- -max_total_time=$(FUZZ_SECONDS)
	cd kernel/devices && cargo fuzz run -s none devices -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096

## The long runs CI has no time for: the whole-API script (examples/soak.rs: random sequences
## on every core, the auditor after every step, the state-coverage table at the end) for
## SOAK_SECONDS (default one hour) or SOAK_CASES sequences, whichever ends first, then the pgm
## fuzz target for SOAK_SECONDS. Fails on any finding, or on an operation that never met a
## state the script means to test.
SOAK_SECONDS ?= 3600
SOAK_CASES ?=
soak: setup
	cargo run --release -p pgm --features sim --example soak -- --seconds $(SOAK_SECONDS) $(if $(SOAK_CASES),--cases $(SOAK_CASES))
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	cd pgm && cargo fuzz run -s none -O --no-trace-compares api -- -max_total_time=$(SOAK_SECONDS) -max_len=512

## Every x86_64 entry of kvm-unit-tests inside the hypervisor, each in a VM of its own, on SVM
## in QEMU's TCG (about half an hour) and then on VMX in Bochs (hours: the vmexit benchmarks
## alone run 2–4·10⁹ ticks each): a line per entry and `kvm-unit-tests: P passed, F failed,
## S skipped` per backend (kernel/README.md, *kvm-unit-tests*). KUT_TESTS names a few entries instead of
## all; `make kut-svm` runs the SVM half only.
KUT_TESTS ?=
kut: kut-svm
	cargo xtask kut $(KUT_TESTS) --timeout 14400

kut-svm: setup
	cargo xtask kut --qemu $(KUT_TESTS) --timeout 5400

## Debian's cloud kernel (pinned in boot/setup.sh) with a busybox initramfs inside the
## hypervisor in Bochs, with 1 vCPU and then 2: each boots to /init, runs the memory workload
## and powers off, with a live migration's pre-copy in each dirty-logging mode on the way
## (kernel/README.md, *Linux guest*); then the same on SVM in QEMU's TCG (about a minute each, both
## pre-copies write-protecting: SVM has no PML). `make test` runs two, for CI's time: the 2-vCPU
## boot in Bochs and the 1-vCPU boot on SVM (the 2-vCPU boot on SVM often fails through a flaw
## of QEMU's TCG: kernel/README.md, *Linux guest*). The 2-vCPU boot in Bochs
## takes about 6 minutes.
linux: setup
	cargo xtask run --linux --timeout 900
	cargo xtask run --linux --cpus 2 --timeout 900
	cargo xtask run --qemu --linux --timeout 900
	cargo xtask run --qemu --linux --cpus 2 --timeout 900
