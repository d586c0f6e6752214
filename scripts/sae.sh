#!/usr/bin/env bash
# Rebuilds the SAEs the project ships (public/saes), on request only (make saes): two to three hours on 2 cores.
# `scripts/sae.sh corpus` (make corpus) stops after step 1.
#   1. the corpus (scripts/corpus.py) from Debian packages installed here if missing;
#   2. for each offline model, TopK SAEs on resid_post of layers spread over the depth (SmolLM2: 5, 10, 15, 20, 25,
#      29; Gemma: 5, 9, 13, 17), from one pass of activations over 400,000 corpus tokens, seed 0, stored in f16.
#      The deeper the layer, the harder plain sentences are to reconstruct: SmolLM2's layers 15 and 20 take k = 64,
#      its layers 25 and 29 k = 64 and 8x the residual width; Gemma's layers 13 and 17 take 4096 latents, and
#      its last layer 6 epochs (docs/benchmarks.md has each one's FVU);
#   3. each SAE's lens.json (its latents' top logit-lens tokens, for the app), its residual norm recorded in its
#      config (sae-stamp, so that the page attaches it without running the model) and public/saes/index.json;
#   4. an evaluation of each on the corpus' held-out split (first 400 lines), on the held-out SAIF contents and on
#      SAIF prompts made from them (crates/saif/tests/data).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

packages=(wordnet-base fortunes fortunes-de fortunes-es debian-reference-en debian-reference-fr debian-reference-de debian-reference-es)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing the corpus' Debian packages: ${missing[*]}"
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq && $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    { echo "sae: could not install ${missing[*]}; retry make saes" >&2; exit 1; }
fi
corpus="$SAIF_CACHE/corpus"
python3 scripts/corpus.py "$corpus"
[ "${1:-}" = corpus ] && exit 0

cargo build --quiet --release --bin saif
saif=${SAIF_BIN:-target/release/saif}
# model file, model key, layers, latents, active latents k and epochs (one value for every layer, or one per layer).
specs=(
  "SmolLM2-135M-Instruct.Q4_1.gguf smollm2-135m 5,10,15,20,25,29 2304,2304,2304,2304,4608,4608 32,32,64,64,64,64 4"
  "gemma-3-270m-q4_k_m.gguf gemma-3-270m 5,9,13,17 2560,2560,4096,4096 64 4,4,4,6"
)
head -400 "$corpus/heldout.txt" >"$corpus/heldout-400.txt"
for spec in "${specs[@]}"; do
  read -r file key layers width k epochs <<<"$spec"
  model="$SAIF_MODELS/$file"
  out="public/saes/$key"
  echo "==> $key: SAEs on layers $layers"
  $saif train-sae --model "$model" --layer "$layers" --width "$width" --k "$k" --tokens 400000 --epochs "$epochs" \
    --seed 0 --corpus "$corpus/train.txt" --out "$out" --json
  for layer in ${layers//,/ }; do
    $saif sae-lens --model "$model" --sae "$out/layer_$layer" --json
    $saif sae-stamp --model "$model" --sae "$out/layer_$layer" --json
    for set in "$corpus/heldout-400.txt" crates/saif/data/contents-heldout.txt crates/saif/tests/data/prompts.txt; do
      $saif sae-eval --model "$model" --sae "$out/layer_$layer" --contents "$set"
    done
  done
done
python3 scripts/sae_index.py
