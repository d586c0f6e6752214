#!/usr/bin/env bash
# Speed of the engine on the offline models, everything measured in the same run on this machine:
#   1. saif bench on the CPU (exact, and with --int8's 8-bit activations) and on wgpu (natively; Mesa's lavapipe
#      where there is no GPU), side by side with llama.cpp on the same files: prefill of a 128-token prompt, 64
#      tokens decoded one at a time after it; llama-bench pp128 / tg64 with the same thread count; the CPU engines
#      in three alternated rounds of 3 runs each, the median of the rounds (wgpu: median of 5 runs);
#   2. batched decoding on the CPU: 16 sequences at once against one alone, timed by the same saif bench call
#      (exact, --int8, and --int8 with --f16-cache; 32-token prompts, 64 tokens decoded, median of 3 runs);
#   3. the app's benchmark page in headless Chromium, on WebGPU (SwiftShader without a GPU) and on the CPU
#      (WebAssembly): a 32-token prompt, 16 decoded tokens, median of 3 runs;
#   4. time to first token in the page for a model already in the browser's cache (tests/e2e/ttft.mjs): from the
#      visit to the model being ready, and from the click on Generate to the first token shown, median of 3 visits.
# llama.cpp comes from a registry package: the source distribution of llama-cpp-python on PyPI vendors it. It is
# built once into ~/.cache/saif/llama.cpp (a few minutes); nothing of it is committed.
# Results land in target/bench/ as JSON and as tables on stdout, for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
threads=$(nproc)
out=target/bench
mkdir -p "$out"

cargo build --quiet --release --bin saif

# llama.cpp built with explicit instruction sets, the ones this CPU reports of AVX, AVX2, FMA, F16C, AVX-512 (F, BW,
# VL, VNNI, BF16) and AVX-VNNI: GGML_NATIVE's -march=native also emits what a sandbox may not run (a Xeon reporting AMX
# and AVX-512 FP16 died with "Illegal instruction"). The build folder is named after the sets, which the table names.
flags=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)
has() { [[ " $flags " == *" $1 "* ]]; }
isa=()
cmake_isa=(-DGGML_NATIVE=OFF)
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C avx512f:AVX512 avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
  if has "${pair%%:*}"; then isa+=("${pair%%:*}"); cmake_isa+=("-DGGML_${pair#*:}=ON"); else cmake_isa+=("-DGGML_${pair#*:}=OFF"); fi
done
has avx512f && isa+=(avx512bw avx512vl) # GGML_AVX512 enables F, BW, VL, DQ and CD together
isa_name=$(IFS=+; echo "${isa[*]:-baseline}")
llama_dir="$SAIF_CACHE/llama.cpp/$LLAMA_CPP_PYTHON"
llama_build="$llama_dir/build-$isa_name"
llama_bench="$llama_build/bin/llama-bench"
if [ ! -x "$llama_bench" ]; then
  echo "==> building llama.cpp ($isa_name) from PyPI's llama-cpp-python $LLAMA_CPP_PYTHON source distribution (once)"
  command -v cmake >/dev/null || { [ "$(id -u)" = 0 ] && apt-get install -y -qq cmake >/dev/null; } ||
    { echo "bench: cmake is needed to build llama.cpp (apt-get install cmake)" >&2; exit 1; }
  mkdir -p "$llama_dir"
  if [ ! -d "$llama_dir"/llama_cpp_python-"$LLAMA_CPP_PYTHON"/vendor/llama.cpp ]; then
    # The way pip finds it: the package's page on the simple index (PEP 503; pip's own index-url if one is set),
    # whose link to the sdist carries its sha256. (PyPI's JSON API is not always served by a registry mirror, and
    # `pip download` would try to build the sdist to read its metadata.)
    python3 scripts/fetch_sdist.py llama-cpp-python "$LLAMA_CPP_PYTHON" "$llama_dir/sdist.tar.gz" ||
      { echo "bench: could not fetch llama-cpp-python $LLAMA_CPP_PYTHON from the package index; retry make bench" >&2; exit 1; }
    tar -xzf "$llama_dir/sdist.tar.gz" -C "$llama_dir"
  fi
  src="$llama_dir/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
  # The compiler's many warnings go to a log, shown if the build fails.
  log="$llama_dir/build-$isa_name.log"
  { cmake -S "$src" -B "$llama_build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF "${cmake_isa[@]}" \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF &&
    cmake --build "$llama_build" --target llama-bench -j"$threads"; } >"$log" 2>&1 ||
    { tail -n 30 "$log" >&2; echo "bench: building llama.cpp failed (log: $log)" >&2; exit 1; }
fi

printf '\n## Native (%s, %s threads)\n\n' "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" "$threads"
printf '| model | engine | prefill 128 (tokens/s) | decode 64 (tokens/s) | time to first token (ms) | hooks overhead | GPU memory (MB) | dispatches/token |\n|---|---|---|---|---|---|---|---|\n'
# The CPU engines in alternated rounds (saif exact, saif --int8, llama.cpp; 3 runs each a round), each figure the
# median of its rounds: this kind of machine drifts by a quarter within minutes, so an engine timed minutes after
# another measured the hour as much as the engine. Each round's decoding speeds are listed under the table.
rounds=3
: >"$out/rounds.md"
for model in SmolLM2-135M-Instruct.Q4_1.gguf gemma-3-270m-q4_k_m.gguf; do
  path="$SAIF_MODELS/$model"
  target/release/saif bench --backend wgpu --model "$path" --prompt-tokens 128 --decode-tokens 64 --runs 5 --json \
    >"$out/saif-wgpu-$model.json" 2>/dev/null
  for round in $(seq "$rounds"); do
    target/release/saif bench --model "$path" --prompt-tokens 128 --decode-tokens 64 --runs 3 --json \
      >"$out/saif-cpu-$model-$round.json" 2>/dev/null
    target/release/saif bench --int8 --model "$path" --prompt-tokens 128 --decode-tokens 64 --runs 3 --json \
      >"$out/saif-cpu-int8-$model-$round.json" 2>/dev/null
    "$llama_bench" -m "$path" -p 128 -n 64 -t "$threads" -r 3 -o json >"$out/llama-$model-$round.json" 2>/dev/null
  done
  python3 - "$model" "$out" "$isa_name" "$rounds" 3>>"$out/rounds.md" <<'EOF'
import json, os, statistics, sys
model, out, isa, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def median_of(name):
    """The rounds' saif bench results, each number the median over the rounds."""
    runs = [json.load(open(f"{out}/{name}-{model}-{r}.json")) for r in range(1, rounds + 1)]
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = statistics.median(run[key] for run in runs)
    merged["rounds"] = [run["decode_tokens_per_s"] for run in runs]
    return merged
cpu, int8 = median_of("saif-cpu"), median_of("saif-cpu-int8")
gpu = json.load(open(f"{out}/saif-wgpu-{model}.json"))
llama_rounds = [json.load(open(f"{out}/llama-{model}-{r}.json")) for r in range(1, rounds + 1)]
def llama_speeds(prompt):
    """Each round's llama-bench speed for the prompt (pp128) or the decoding (tg64)."""
    return [next(x["avg_ts"] for x in run if (x["n_prompt"] > 0) == prompt and (x["n_gen"] > 0) != prompt)
            for run in llama_rounds]
pp, tg = statistics.median(llama_speeds(True)), statistics.median(llama_speeds(False))
def row(name, r):
    hooks = f"{r['hooks_overhead_percent']:+.1f}%" if r.get("hooks_overhead_percent") is not None else ""
    mem = f"{r['gpu_memory_bytes'] / 1e6:.0f}" if r.get("gpu_memory_bytes") else ""
    disp = r.get("dispatches_per_token") or ""
    print(f"| {model} | {name} | {r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | {r['time_to_first_token_ms']:.0f} | {hooks} | {mem} | {disp} |")
row("saif cpu", cpu)
row("saif cpu --int8 (8-bit activations, not exact)", int8)
row(f"saif {gpu['backend']}", gpu)
print(f"| {model} | llama.cpp {llama_rounds[0][0].get('build_commit', '')} cpu ({isa}) | {pp:.1f} | {tg:.1f} | | | | |")
print(f"| {model} | ratio saif cpu / llama.cpp | {cpu['prefill_tokens_per_s'] / pp:.2f} | {cpu['decode_tokens_per_s'] / tg:.2f} | | | | |")
print(f"| {model} | ratio saif cpu --int8 / llama.cpp | {int8['prefill_tokens_per_s'] / pp:.2f} | {int8['decode_tokens_per_s'] / tg:.2f} | | | | |")
print(f"| {model} | ratio saif wgpu / saif cpu | {gpu['prefill_tokens_per_s'] / cpu['prefill_tokens_per_s']:.2f} | {gpu['decode_tokens_per_s'] / cpu['decode_tokens_per_s']:.2f} | | | | |")
# Each round's decoding speeds, for the list under the table (file descriptor 3).
each = lambda values: ", ".join(f"{v:.1f}" for v in values)
with os.fdopen(3, "w") as rounds_file:
    print(f"- {model}, decoding by round (tokens/s): saif cpu {each(cpu['rounds'])}; --int8 {each(int8['rounds'])}; "
          f"llama.cpp {each(llama_speeds(False))}", file=rounds_file)
EOF
done
printf '\n'
cat "$out/rounds.md"

# Batched decoding, for evaluations and sweeps: 16 sequences decoding together against one sequence alone, both
# timed by the same saif bench call (a 32-token prompt each, 64 tokens decoded, median of 3 runs).
printf '\n## Batched decoding on the CPU (16 sequences, 32-token prompts, 64 tokens decoded, median of 3)\n\n'
printf '| model | products | one sequence (tokens/s) | 16 sequences (tokens/s, all together) | ratio |\n|---|---|---|---|---|\n'
for model in SmolLM2-135M-Instruct.Q4_1.gguf gemma-3-270m-q4_k_m.gguf; do
  for mode in exact int8 int8-f16; do
    flag=(); [ "$mode" = int8 ] && flag=(--int8); [ "$mode" = int8-f16 ] && flag=(--int8 --f16-cache)
    target/release/saif bench "${flag[@]}" --batch 16 --model "$SAIF_MODELS/$model" --prompt-tokens 32 \
      --decode-tokens 64 --runs 3 --no-hooks --json >"$out/saif-cpu-batch16-$mode-$model.json" 2>/dev/null
    python3 - "$out/saif-cpu-batch16-$mode-$model.json" "$model" "$mode" <<'EOF'
import json, sys
r, model, mode = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
one, batched = r["decode_tokens_per_s"], r["batched_decode_tokens_per_s"]
name = {"exact": "exact", "int8": "--int8 (8-bit activations)",
        "int8-f16": "--int8 --f16-cache (and an f16 KV cache, as llama.cpp's)"}[mode]
print(f"| {model} | {name} | {one:.1f} | {batched:.1f} | {batched / one:.2f}x |")
EOF
  done
done

printf '\n## Headless Chromium, the app'"'"'s benchmark page (32-token prompt, 16 decoded tokens, median of 3)\n\n'
scripts/app.sh build >/dev/null 2>&1
(cd tests/e2e && node bench.mjs 32 16 3) >"$out/browser.jsonl"
python3 - "$out/browser.jsonl" <<'EOF'
import json, sys
keys = ["runsOn", "Prefill", "Decode", "Time to first token", "Decode with steering and an SAE read", "GPU memory held",
        "Dispatches per token"]
print("| model | runs on | prefill | decode | time to first token | with hooks | GPU memory | dispatches/token |")
print("|---|---|---|---|---|---|---|---|")
for line in sorted(open(sys.argv[1]), key=lambda line: json.loads(line)["model"], reverse=True):
    r = json.loads(line)
    print("| " + " | ".join([r["model"]] + [r.get(k, "") for k in keys]) + " |")
EOF

printf '\n## Headless Chromium, time to first token for a model in the browser'"'"'s cache (median of 3 visits)\n\n'
(cd tests/e2e && node ttft.mjs 3 cpu) >"$out/ttft.jsonl"
python3 - "$out/ttft.jsonl" <<'EOF'
import json, sys
print("| model | backend | visit to ready (ms) | click on Generate to first token (ms) | the worker's own (ms) | visit to first token (ms) |")
print("|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"| {r['model']} | {r['backend']} | {r['visit_to_ready_ms']} | {r['click_to_first_token_ms']} | {r['worker_first_token_ms']} | {r['visit_to_first_token_ms']} |")
EOF
echo
echo "raw results in $out/"
