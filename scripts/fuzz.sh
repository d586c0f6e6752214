#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo fuzz, libFuzzer with AddressSanitizer) of every reader of a stranger's bytes:
# the GGUF loader, both SAE formats (and their shape checks), lens.json and the shared link (fuzz/fuzz_targets, saif_app::untrusted).
#   scripts/fuzz.sh [SECONDS]   each target for SECONDS (make fuzz: 300; make test: 15); SAIF_FUZZ_TARGETS="gguf link"
#                               runs only those
# Seeds: fuzz/corpus (fuzz/seeds.py), the engine's fixture models, and fuzz/regressions. What a run learns goes to
# target/fuzz-corpus, so the committed seeds stay as they are. A crash, a hang (over 10 s), an allocation of
# more than 512 MiB at once, or more than 2 GiB resident fails the run, and the input is kept in
# fuzz/regressions/<target>/ for tests/untrusted.rs to replay from then on.
# A stable compiler takes the sanitizer flags with RUSTC_BOOTSTRAP=1 (the only toolchain a fresh machine has).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
seconds=${1:-300}
targets=(${SAIF_FUZZ_TARGETS:-gguf sae_gemma_scope sae_lens sae_shapes lens_json link})

command -v cargo-fuzz >/dev/null || { echo "fuzz: cargo-fuzz is missing; run make setup" >&2; exit 1; }
echo "==> building the fuzz targets (cargo fuzz, AddressSanitizer)"
(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build -O --target-dir ../target/fuzz)
bin=target/fuzz/x86_64-unknown-linux-gnu/release

mkdir -p target/fuzz-seeds/gguf
cp crates/engine/tests/fixtures/*.gguf target/fuzz-seeds/gguf/
for t in "${targets[@]}"; do
  mkdir -p "target/fuzz-corpus/$t" "fuzz/regressions/$t"
  echo "==> fuzzing $t for ${seconds} s"
  log="target/fuzz-corpus/$t.log"
  seeds=()
  for d in "fuzz/corpus/$t" "fuzz/regressions/$t" "target/fuzz-seeds/$t"; do [ -d "$d" ] && seeds+=("$d"); done
  if ! "$bin/$t" -max_total_time="$seconds" -timeout=10 -malloc_limit_mb=512 -rss_limit_mb=2048 \
    -artifact_prefix="fuzz/regressions/$t/" -print_final_stats=1 "target/fuzz-corpus/$t" "${seeds[@]}" >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz: $t failed; the input is in fuzz/regressions/$t/ (replay: cargo test --test untrusted)" >&2
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  corpus=$(ls "target/fuzz-corpus/$t" | wc -l)
  echo "    $runs inputs run, no crash; $corpus inputs in target/fuzz-corpus/$t"
done
