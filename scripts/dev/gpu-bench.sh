#!/usr/bin/env bash
# The native benchmark and the WGSL kernel tests on a lent GPU machine (the session's `device` tool: it runs a
# command over a copy of this checkout's tracked files plus the paths a call carries, 64 MiB in all, and the machine
# reaches nothing outside). What it needs is built and packed here first; docs/benchmarks.md (2026-12-04, the H200
# run) tells how this was first done by hand.
#
#   scripts/dev/gpu-bench.sh prepare   here: builds `saif` and the `gpu_kernels` tests, packs them with Vulkan's
#                                      loader and glvnd (Debian packages) and SmolLM2 (in two halves) into
#                                      .device/1-3 (ignored), and takes public/saes out of the index and ignores it: the
#                                      shipped SAEs make the tree 91 MB, 13 MB without them. A pre-commit hook
#                                      refuses commits until `restore`.
#   device run, three calls in a row (the machine goes back after 30 s idle), each with carry [".device/N"]:
#     bash scripts/dev/gpu-bench.sh run 1
#     bash scripts/dev/gpu-bench.sh run 2
#     bash scripts/dev/gpu-bench.sh run 3       the last part: joins the model, runs the tests and the benchmarks,
#                                                and writes $OUT/gpu-bench.txt
#   scripts/dev/gpu-bench.sh restore   here: puts public/saes back in the index and removes the hook.
#
# `run` keeps what it receives in /tmp/keep between the calls. To try it on a machine with a Vulkan loader (lavapipe
# here): SKIP_PACKAGES=1 skips unpacking the Debian packages, and PROMPT_TOKENS, DECODE_TOKENS and RUNS shorten the
# benchmarks (128, 64 and 3).
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL=SmolLM2-135M-Instruct.Q4_1.gguf
PACKAGES="libvulkan1 libglvnd0 libglx0 libegl1 libgl1 libopengl0 libgles2"
HOOK=.git/hooks/pre-commit

prepare() {
  source scripts/env.sh
  rm -rf .device && mkdir -p .device/1 .device/2 .device/3
  mkdir -p .git/info && touch .git/info/exclude
  grep -qx '/.device/' .git/info/exclude || echo '/.device/' >>.git/info/exclude

  cargo build --release -p saif-cli
  local tests
  tests=$(cargo test --release -p saif-engine --test gpu_kernels --no-run 2>&1 |
    grep -o 'target/release/deps/gpu_kernels-[0-9a-f]*' | head -1)
  [ -x "$tests" ] || { echo "the gpu_kernels test binary was not found" >&2; exit 1; }
  xz -T2 -c target/release/saif >.device/3/saif.xz
  xz -T2 -c "$tests" >.device/3/gpu_kernels.xz

  local apt_options=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64-lists)
  mkdir -p /tmp/amd64-lists/partial
  apt-get "${apt_options[@]}" update -qq
  # shellcheck disable=SC2086 # one argument per package
  (cd .device/3 && apt-get "${apt_options[@]}" download -qq $PACKAGES)

  split -n 2 -d "$SAIF_MODELS/$MODEL" .device/model.part-
  mv .device/model.part-00 .device/1/ && mv .device/model.part-01 .device/2/
  (cd "$SAIF_MODELS" && md5sum "$MODEL") >.device/3/model.md5

  # Out of the index and ignored: the device tool also sends the untracked files that git does not ignore.
  git rm -r --cached -q public/saes
  grep -qx '/public/saes/' .git/info/exclude || echo '/public/saes/' >>.git/info/exclude
  mkdir -p "$(dirname "$HOOK")"
  local why="public/saes is out of the index for a device run: scripts/dev/gpu-bench.sh restore"
  printf '#!/bin/sh\necho "%s" >&2\nexit 1\n' "$why" >"$HOOK"
  chmod +x "$HOOK"
  local tree
  tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
  for part in 1 2 3; do
    echo "call $part carries $(du -sb .device/$part | cut -f1) bytes, with the tree's $tree (at most 67108864)"
  done
  echo "public/saes is out of the index until: scripts/dev/gpu-bench.sh restore"
}

restore() {
  sed -i '\|^/public/saes/$|d' .git/info/exclude
  git reset -q HEAD -- public/saes
  rm -f "$HOOK"
  git status --short public/saes
  echo "public/saes is back in the index"
}

run() {
  local part=$1 keep=/tmp/keep
  mkdir -p "$keep"
  cp .device/"$part"/* "$keep"/
  [ "$part" = 3 ] || { ls -la "$keep"; return; }

  if [ "${SKIP_PACKAGES:-0}" != 1 ]; then
    for deb in "$keep"/*.deb; do dpkg -x "$deb" /; done
    ldconfig
    export LD_LIBRARY_PATH=/usr/local/nvidia/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  fi
  (cd "$keep" && cat model.part-00 model.part-01 >"$MODEL" && md5sum -c model.md5 && unxz -f saif.xz gpu_kernels.xz)
  chmod +x "$keep"/saif "$keep"/gpu_kernels
  # The kernel tests find their fixtures by this checkout's path where they were built.
  [ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }

  local out=${OUT:-/tmp}/gpu-bench.txt model="$keep/$MODEL"
  {
    local gpu
    gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')
    echo "== $(date -u) $gpu"
    echo "== the WGSL kernels against their CPU twins, one test at a time"
    # Each test alone: run all at once, the harness's threads once waited on each other's devices for minutes.
    for test in $("$keep"/gpu_kernels --list 2>/dev/null | sed -n 's/: test$//p'); do
      timeout 120 "$keep"/gpu_kernels --exact "$test" --test-threads 1 2>&1 |
        grep -E '^test |FAILED|panicked' || echo "$test: no result (timed out?)"
    done
    local sizes=(--prompt-tokens "${PROMPT_TOKENS:-128}" --decode-tokens "${DECODE_TOKENS:-64}" --runs "${RUNS:-3}")
    local bench=("$keep"/saif bench --model "$model" "${sizes[@]}" --no-hooks)
    echo "== one sequence, each form of the matrix products"
    for form in subgroup cooperative per-row; do
      echo "-- SAIF_GPU_MATMUL=$form"
      SAIF_GPU_MATMUL=$form timeout 300 "${bench[@]}" --backend wgpu 2>&1 | tail -8
    done
    echo "== the f16 KV cache, and batches of 4 and 16"
    timeout 300 "${bench[@]}" --backend wgpu --f16-cache 2>&1 | tail -8
    timeout 300 "${bench[@]}" --backend wgpu --batch 4 2>&1 | tail -8
    timeout 300 "${bench[@]}" --backend wgpu --batch 16 --f16-cache 2>&1 | tail -8
    echo "== with hooks (a steering vector and a read hook)"
    timeout 300 "$keep"/saif bench --model "$model" "${sizes[@]}" --backend wgpu 2>&1 | tail -8
    echo "== the machine's CPU, for scale"
    timeout 300 "${bench[@]}" --int8 --batch 16 2>&1 | tail -8
  } 2>&1 | tee "$out"
}

case "${1:-}" in
  prepare) prepare ;;
  restore) restore ;;
  run) run "${2:?run 1, 2 or 3}" ;;
  *) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" >&2; exit 2 ;;
esac
