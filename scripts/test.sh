#!/usr/bin/env bash
# Every test of the project, in the order a failure is cheapest to find:
#   1. native: the engine on the CPU and on wgpu (Mesa's lavapipe without a GPU) against ../shared/golden, the
#      project's further references, transformers fixtures, recomputation without the KV cache, hooks, bad
#      input; every WGSL kernel against its CPU twin; the saif command-line contract; the app's plain-Rust logic;
#   2. the engine compiled to wasm, in headless Chromium (wasm-bindgen-test): tokenizers, the CPU path, every
#      WGSL kernel and the fixture models on WebGPU (SwiftShader without a GPU); the SAE trainer's kernels there
#      against their CPU twins;
#   3. the page built with trunk and driven end to end in headless Chromium (tests/e2e): loading, caching,
#      errors, tokenizing, generating on WebGPU and on the CPU, the benchmark page;
#   4. a short coverage-guided fuzz pass over every reader of untrusted bytes (scripts/fuzz.sh, 15 s a target).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
say() { printf '\n==> %s\n' "$*"; }
# wgpu's Vulkan loader (lavapipe here) complains without a runtime directory.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

say "native tests"
cargo test --release --workspace

say "the engine and the SAE trainer's kernels in headless Chromium (wasm-bindgen-test)"
export SAIF_WASM_FIXTURES="$PWD/target/wasm-fixtures"
mkdir -p "$SAIF_WASM_FIXTURES"
cargo run --quiet --release -p saif-engine --example tokenizer_gguf -- \
  "$SAIF_MODELS/gemma-3-270m-q4_k_m.gguf" "$SAIF_WASM_FIXTURES/gemma-3-270m-tokenizer.gguf"
cargo run --quiet --release -p saif-engine --example tokenizer_gguf -- \
  "$SAIF_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf" "$SAIF_WASM_FIXTURES/smollm2-135m-tokenizer.gguf"
(
  use_wasm_toolchain
  export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
  export CHROMEDRIVER=/usr/bin/chromedriver WASM_BINDGEN_TEST_TIMEOUT=600
  # Each crate's webdriver.json (headless Chromium with WebGPU) lives in its folder.
  (cd crates/engine && cargo test --release --target wasm32-unknown-unknown --test wasm)
  (cd crates/saif && cargo test --release --target wasm32-unknown-unknown --test wasm)
)

say "the page, end to end in headless Chromium"
scripts/app.sh build
(cd tests/e2e && node --test)

say "a short fuzz pass over every parser (make fuzz runs longer)"
scripts/fuzz.sh "${SAIF_FUZZ_SECONDS:-15}"

say "all tests passed"
