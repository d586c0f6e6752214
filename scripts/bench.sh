#!/usr/bin/env bash
# Speed of the engine on the offline models, side by side with llama.cpp on the same files in the same run.
#   saif bench: prefill of a 128-token prompt, then 64 tokens decoded one at a time; median of 5 runs.
#   llama-bench: pp128 and tg64 with the same thread count, 5 repetitions.
# llama.cpp comes from a registry package: the source distribution of llama-cpp-python on PyPI vendors it. It is
# built once into ~/.cache/saif/llama.cpp (a few minutes); nothing of it is committed.
# Results land in target/bench/ as JSON and as a table on stdout, for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
threads=$(nproc)
out=target/bench
mkdir -p "$out"

cargo build --quiet --release --bin saif

llama_dir="$SAIF_CACHE/llama.cpp/$LLAMA_CPP_PYTHON"
llama_bench="$llama_dir/build/bin/llama-bench"
if [ ! -x "$llama_bench" ]; then
  echo "==> building llama.cpp from PyPI's llama-cpp-python $LLAMA_CPP_PYTHON source distribution (once)"
  command -v cmake >/dev/null || { [ "$(id -u)" = 0 ] && apt-get install -y -qq cmake >/dev/null; } ||
    { echo "bench: cmake is needed to build llama.cpp (apt-get install cmake)" >&2; exit 1; }
  mkdir -p "$llama_dir"
  # The JSON API names the sdist; `pip download` would try to build it to read its metadata.
  url=$(python3 - "$LLAMA_CPP_PYTHON" <<'EOF'
import json, sys, urllib.parse, urllib.request
api = f"https://pypi.org/pypi/llama-cpp-python/{sys.argv[1]}/json"
data = json.load(urllib.request.urlopen(api))
print(next(urllib.parse.urljoin(api, u["url"]) for u in data["urls"] if u["packagetype"] == "sdist"))
EOF
  ) || { echo "bench: PyPI unreachable; retry make bench" >&2; exit 1; }
  curl -sfL "$url" -o "$llama_dir/sdist.tar.gz" || { echo "bench: download of $url failed; retry" >&2; exit 1; }
  tar -xzf "$llama_dir/sdist.tar.gz" -C "$llama_dir"
  src=$(ls -d "$llama_dir"/llama_cpp_python-*/vendor/llama.cpp)
  cmake -S "$src" -B "$llama_dir/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$llama_dir/build" --target llama-bench -j"$threads" >/dev/null
fi

printf '\n| model | engine | prefill 128 (tokens/s) | decode 64 (tokens/s) |\n|---|---|---|---|\n'
for model in SmolLM2-135M-Instruct.Q4_1.gguf gemma-3-270m-q4_k_m.gguf; do
  path="$SAIF_MODELS/$model"
  target/release/saif bench --model "$path" --prompt-tokens 128 --decode-tokens 64 --runs 5 --json >"$out/saif-$model.json"
  "$llama_bench" -m "$path" -p 128 -n 64 -t "$threads" -r 5 -o json >"$out/llama-$model.json" 2>/dev/null
  python3 - "$model" "$out/saif-$model.json" "$out/llama-$model.json" <<'EOF'
import json, sys
model, saif, llama = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
pp = next(r["avg_ts"] for r in llama if r["n_prompt"] > 0 and r["n_gen"] == 0)
tg = next(r["avg_ts"] for r in llama if r["n_gen"] > 0 and r["n_prompt"] == 0)
sp, sd = saif["prefill_tokens_per_s"], saif["decode_tokens_per_s"]
print(f"| {model} | saif (cpu) | {sp:.1f} | {sd:.1f} |")
print(f"| {model} | llama.cpp {llama[0].get('build_commit', '')} (cpu, {llama[0]['n_threads']} threads) | {pp:.1f} | {tg:.1f} |")
print(f"| {model} | ratio saif / llama.cpp | {sp / pp:.2f} | {sd / tg:.2f} |")
EOF
done
echo
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads; raw results in $out/"
