#!/usr/bin/env bash
# Builds the engine worker's threaded form (feature `threads`) beside the plain one that trunk builds: the same
# worker with WebAssembly atomics and shared memory, whose rayon pool runs in Web Workers (src/worker/threads.rs).
# Trunk runs it after each build (Trunk.toml's post_build hook) and it writes into trunk's staging folder;
# run by hand it writes into dist/. The standard library is built again with atomics, in its own target folder.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
use_debian_wasm_toolchain
out="${TRUNK_STAGING_DIR:-dist}"

# Shared memory must declare its maximum: 4 GiB, the most wasm32 addresses (Gemma 3 270M needs about 0.6 GiB).
export RUSTFLAGS='-C target-feature=+simd128,+atomics,+bulk-memory,+mutable-globals --cfg getrandom_backend="wasm_js" -C link-arg=--max-memory=4294967296'
# The link of the worker itself: its memory shared and imported (wasm-bindgen's JS creates it and hands it to each
# thread), and the thread-local storage symbols wasm-bindgen sets up each thread with. rustc does not pass these
# for an unstable target feature.
link=(--shared-memory --import-memory --export=__wasm_init_tls --export=__tls_size --export=__tls_align
  --export=__tls_base)
cargo rustc --release --target wasm32-unknown-unknown --bin saif-worker --features threads \
  --target-dir target/wasm-threads -- "${link[@]/#/-Clink-arg=}"
wasm-bindgen --target web --no-typescript --out-dir "$out" --out-name saif-worker-threads \
  target/wasm-threads/wasm32-unknown-unknown/release/saif-worker.wasm
cp scripts/saif-worker-threads_loader.js "$out/"
