# Shared settings for the project's scripts (sourced, not run).
#   SAIF_CACHE  where downloads, models and cargo tools are kept between runs (default ~/.cache/saif)
#   SAIF_MODELS the offline GGUF models (filled by scripts/fetch-models.sh)
#   SAIF_TOOLS  the cargo install root of trunk and wasm-bindgen-cli
export SAIF_CACHE="${SAIF_CACHE:-$HOME/.cache/saif}"
export SAIF_MODELS="${SAIF_MODELS:-$SAIF_CACHE/models}"
export SAIF_TOOLS="${SAIF_TOOLS:-$SAIF_CACHE/tools}"
export PATH="$SAIF_TOOLS/bin:$HOME/.cargo/bin:$PATH"

# True when rustup has the wasm32 target (a developer laptop with internet).
wasm_route_rustup() {
  command -v rustup >/dev/null 2>&1 && rustup target list --installed 2>/dev/null | grep -q '^wasm32-unknown-unknown$'
}

# Puts the wasm32 toolchain in front for the commands that follow. Without rustup's target this is Debian's
# rustc-web 1.96, which ships the std source: cargo builds std for wasm32 itself (-Z build-std, allowed on a stable
# compiler by RUSTC_BOOTSTRAP) and links with LLVM's wasm-ld.
use_wasm_toolchain() {
  if wasm_route_rustup; then return 0; fi
  use_debian_wasm_toolchain
}

# Debian's rustc-web with the std source, whatever rustup has: the worker's threaded build needs std built again
# with atomics (scripts/worker-threads.sh), which rustup's prebuilt wasm32 std is not.
use_debian_wasm_toolchain() {
  export PATH="/usr/bin:$PATH"
  export RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1
  export CARGO_UNSTABLE_BUILD_STD=std,panic_abort
  export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=/usr/lib/llvm-16/bin/wasm-ld
}
