#!/usr/bin/env bash
# Installs what `make run` and `make test` need on a fresh Debian machine: the pinned Rust
# toolchain (from rust-toolchain.toml, installed explicitly: rustup's auto-install may be off)
# and the emulators. Quiet and quick when everything is present. Without root it prints the
# apt-get command to run instead.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(bochs bochsbios vgabios bochs-x xvfb xauth qemu-system-x86 ovmf gcc make git)
components=(rust-src llvm-tools-preview rustfmt clippy)
target=x86_64-unknown-none

missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" -eq 0 ]; then
        echo "setup: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: missing Debian packages; run:"
        echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}"
        exit 1
    fi
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v rustup >/dev/null; then
    echo "setup: rustup is missing; install it (https://rustup.rs), then run make again"
    exit 1
fi
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
installed_components=$(rustup component list --toolchain "$toolchain" --installed 2>/dev/null || true)
installed_targets=$(rustup target list --toolchain "$toolchain" --installed 2>/dev/null || true)
need_toolchain=0
# rustup lists llvm-tools-preview as llvm-tools-<host>.
for component in rust-src llvm-tools rustfmt clippy; do
    grep -q "^${component}" <<<"$installed_components" || need_toolchain=1
done
grep -qx "$target" <<<"$installed_targets" || need_toolchain=1
if ((need_toolchain)); then
    echo "setup: installing Rust $toolchain with ${components[*]} and $target"
    rustup toolchain install "$toolchain" --profile minimal \
        --component "$(IFS=,; echo "${components[*]}")" --target "$target"
fi

# kvm-unit-tests, pinned: built from the tarball in ../shared/third_party (or where
# KUT_TARBALL says) when it is there, checked against its sha256, else fetched with git at the
# same commit. About 6 s. Without either (no shared folder, no network) it is not built:
# `make test` then says so and reports its kvm-unit-tests subset as not run.
kut_commit=1da1819e49fc4938985edca67df669099b4c87a7
kut_sha256=c161fa1bd3ef3815d6669ab2038d62149bfa65ac5f08d494867adc5b41c80cd9
kut_dir=target/kvm-unit-tests
kut_name=kvm-unit-tests-${kut_commit:0:12}.tar.gz
kut_tarball=${KUT_TARBALL:-}
for candidate in "../shared/third_party/$kut_name" "/work/shared/third_party/$kut_name"; do
    if [ -z "$kut_tarball" ] && [ -f "$candidate" ]; then
        kut_tarball=$candidate
    fi
done
if [ ! -f "$kut_dir/.built-$kut_commit" ]; then
    echo "setup: building kvm-unit-tests ${kut_commit:0:12} in $kut_dir"
    rm -rf "$kut_dir"
    mkdir -p "$kut_dir"
    fetched=1
    if [ -n "$kut_tarball" ] && [ -f "$kut_tarball" ]; then
        echo "$kut_sha256  $kut_tarball" | sha256sum --check --quiet
        tar xzf "$kut_tarball" -C "$kut_dir" --strip-components=1
    else
        echo "setup: no $kut_name in ../shared/third_party; fetching the same commit with git"
        if git clone --quiet https://gitlab.com/kvm-unit-tests/kvm-unit-tests "$kut_dir" 2>/dev/null; then
            git -C "$kut_dir" checkout --quiet "$kut_commit"
        else
            fetched=0
            rm -rf "$kut_dir"
            echo "setup: WARNING: kvm-unit-tests could not be fetched (no network); the kvm-unit-tests runs are skipped"
        fi
    fi
    if ((fetched)); then
        if ! (cd "$kut_dir" && ./configure --arch=x86_64 && make -j2) >"$kut_dir.log" 2>&1; then
            cat "$kut_dir.log"
            echo "setup: kvm-unit-tests did not build (log above)"
            exit 1
        fi
        touch "$kut_dir/.built-$kut_commit"
    fi
fi

# The Linux guest: Debian's cloud kernel and a static busybox, pinned here and nowhere else,
# fetched with apt-get download and unpacked into target/linux/root (kernel at
# boot/vmlinuz-*, busybox at bin/busybox). Without a network it warns; the Linux boot is then
# reported as not run.
linux_packages=(linux-image-6.1.0-57-cloud-amd64=6.1.192-3 busybox-static=1:1.35.0-4+deb12u1+b1)
linux_dir=target/linux
linux_stamp="$linux_dir/.fetched-$(echo "${linux_packages[*]}" | sha256sum | cut -c1-16)"
if [ ! -f "$linux_stamp" ]; then
    echo "setup: fetching the Linux guest's packages: ${linux_packages[*]}"
    rm -rf "$linux_dir"
    mkdir -p "$linux_dir/debs" "$linux_dir/root"
    # apt-get download runs its fetch as the _apt user, which needs to write here.
    chmod 777 "$linux_dir/debs"
    if (cd "$linux_dir/debs" && apt-get download -qq "${linux_packages[@]}" 2>/dev/null); then
        for deb in "$linux_dir"/debs/*.deb; do
            dpkg-deb -x "$deb" "$linux_dir/root"
        done
        touch "$linux_stamp"
    else
        rm -rf "$linux_dir"
        echo "setup: WARNING: the Linux guest's packages could not be fetched (no network?); the Linux boot is not run"
    fi
fi
