#!/usr/bin/env bash
# The experiments behind docs/results.md (make results), on both offline models, in four stages:
#   tune      a layer x alpha grid for translate-fr (SAIF and difference-in-means) on 40 discovery contents, then an
#             alpha sweep of every instruction at the chosen layer; scripts/results.py picks the best settings and
#             records them in crates/saif/data/steering.json (the defaults of saif and the page);
#   findings  the paper's three findings on the 120 held-out contents: the layer (each at its tuned alpha), the
#             number of latents k, and the instruction's placement; and the two rankings of latents (delta, output);
#   tables    every method on every instruction on the held-out contents (saif table);
#   report    the markdown tables and charts of docs/results.md (scripts/results.py).
# `scripts/results.sh STAGE` runs one stage; without one, all of them. Everything lands in docs/results/.
# Knobs (the defaults are the full run, several hours on 2 cores; docs/results.md says which ones it used):
#   RESULTS_MODELS=smollm2-135m    only these models;
#   RESULTS_LAYERS=15,20           tune only these layers' grid (and stop before picking the layer);
#   RESULTS_ALPHAS=1,2,3           the strengths tuned over, instead of each model's own;
#   RESULTS_TUNE_LIMIT=40          discovery contents per tuning point;
#   RESULTS_LIMIT=120              held-out contents per finding;
#   RESULTS_TABLE_LIMIT=120        held-out contents per cell of the table;
#   RESULTS_TOKENS=32              new tokens per answer;
#   RESULTS_TUNED=all              instructions tuned at the chosen layer besides translate-fr (none: they take
#                                  translate-fr's settings; a list such as summarize,uppercase: only those);
#   RESULTS_GRID=skip              keep the stored translate-fr grid and only tune the other instructions;
#   RESULTS_K=1,3,5,10,15,30,60    the numbers of latents of the k finding;
#   RESULTS_FINDINGS=k,rank        only these findings (layer, k, placement, coefficient, rank);
#   RESULTS_FINDINGS_INSTRUCTIONS=translate-es,uppercase
#                                  the instructions of the k and placement findings (default translate-fr).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

cargo build --quiet --release --bin saif
saif=${SAIF_BIN:-target/release/saif}
out=docs/results
tokens=${RESULTS_TOKENS:-32}
tune_limit=${RESULTS_TUNE_LIMIT:-40}
limit=${RESULTS_LIMIT:-120}
table_limit=${RESULTS_TABLE_LIMIT:-120}
ks=${RESULTS_K:-1,3,5,10,15,30,60}
RESULTS_FINDINGS_INSTRUCTIONS=${RESULTS_FINDINGS_INSTRUCTIONS:-translate-fr}
stage=${1:-all}

# model file, SAE key, layers with a shipped SAE, the strengths tuned over, and whether the findings beyond the
# layer are run. The pretrained Gemma follows no instruction when prompted (the tables show it), so it gets a
# coarser tuning and only the layer experiment: its generations are the slowest of the two.
models=(
  "SmolLM2-135M-Instruct.Q4_1.gguf smollm2-135m 5,10,15,20,25,29 0.5,1,1.5,2,3 all"
  "gemma-3-270m-q4_k_m.gguf gemma-3-270m 5,9,13,17 0.5,1,2 layer"
)
instructions=(translate-fr translate-es translate-de summarize include-word uppercase)
tuned=("${instructions[@]:1}")
case "${RESULTS_TUNED:-all}" in
  all) ;;
  none) tuned=() ;;
  *) IFS=, read -r -a tuned <<<"$RESULTS_TUNED" ;;
esac
mkdir -p "$out"
# The first $limit held-out contents, for `saif eval --contents`.
heldout="$out/heldout-$limit.txt"
head -"$limit" crates/saif/data/contents-heldout.txt >"$heldout"

# Keeps only the models RESULTS_MODELS names (all by default).
if [ -n "${RESULTS_MODELS:-}" ]; then
  kept=()
  for spec in "${models[@]}"; do
    read -r _ key _ _ _ <<<"$spec"
    [[ ",$RESULTS_MODELS," == *",$key,"* ]] && kept+=("$spec")
  done
  models=("${kept[@]}")
fi

# Whether the findings stage runs PART (RESULTS_FINDINGS=layer,k,placement,coefficient,rank; default all).
part() { [[ ",${RESULTS_FINDINGS:-layer,k,placement,coefficient,rank}," == *",$1,"* ]]; }

run() { # prints the command, then runs it with its JSON on stdout discarded (the files are what count)
  echo "+ saif $*" >&2
  "$saif" "$@" --json >/dev/null
}

if [ "$stage" = all ] || [ "$stage" = tune ]; then
  for spec in "${models[@]}"; do
    read -r file key layers alphas _ <<<"$spec"
    model="$SAIF_MODELS/$file"
    alphas=${RESULTS_ALPHAS:-$alphas}
    tune() { # instruction layer: SAIF and difference-in-means over the strengths, on the tuning contents
      for method in saif diffmean; do
        folder="$out/tune/$key/layer_$2"
        [ $method = diffmean ] && folder="$folder/diffmean"
        run sweep --model "$model" --instruction "$1" --layer "$2" --param alpha --values "$alphas" --methods $method \
          --on discovery --limit "$tune_limit" --max-new-tokens "$tokens" --out "$folder"
      done
    }
    if [ "${RESULTS_GRID:-}" != skip ]; then
      for layer in $(tr , ' ' <<<"${RESULTS_LAYERS:-$layers}"); do
        tune translate-fr "$layer"
      done
    fi
    [ -z "${RESULTS_LAYERS:-}" ] || continue
    layer=$(python3 scripts/results.py layer "$key")
    for instruction in "${tuned[@]}"; do
      tune "$instruction" "$layer"
    done
    python3 scripts/results.py defaults "$key"
  done
fi

if [ "$stage" = all ] || [ "$stage" = findings ]; then
  for spec in "${models[@]}"; do
    read -r file key layers _ findings <<<"$spec"
    model="$SAIF_MODELS/$file"
    mkdir -p "$out/findings/$key"
    # The layer: SAIF and difference-in-means at every shipped layer, each at the alpha tuned for that layer.
    if part layer; then
      for layer in ${layers//,/ }; do
        read -r alpha diffmean_alpha <<<"$(python3 scripts/results.py layer-alphas "$key" "$layer")"
        echo "+ saif eval --layer $layer (saif at $alpha, diffmean at $diffmean_alpha)" >&2
        "$saif" eval --model "$model" --instruction translate-fr --method saif --layer "$layer" --alpha "$alpha" \
          --contents "$heldout" --max-new-tokens $tokens --seed 0 --json >"$out/findings/$key/layer-$layer-saif.json"
        "$saif" eval --model "$model" --instruction translate-fr --method diffmean --layer "$layer" \
          --alpha "$diffmean_alpha" --contents "$heldout" --max-new-tokens $tokens --seed 0 --json \
          >"$out/findings/$key/layer-$layer-diffmean.json"
      done
    fi
    [ "$findings" = all ] || continue
    # k (SAIF and random latents of the same norm) and the placement, at the recorded settings.
    for instruction in ${RESULTS_FINDINGS_INSTRUCTIONS//,/ }; do
      part k && run sweep --model "$model" --instruction "$instruction" --param k --values "$ks" \
        --methods saif,random --limit "$limit" --max-new-tokens $tokens --out "$out/findings/$key"
      part placement && run sweep --model "$model" --instruction "$instruction" --param placement \
        --values after,before --methods saif,diffmean --limit "$limit" --max-new-tokens $tokens \
        --out "$out/findings/$key"
    done
    # The paper's coefficient (each latent's mean activation with the instruction) instead of its delta.
    part coefficient && run sweep --model "$model" --instruction translate-fr --param alpha \
      --values "${RESULTS_MEAN_ALPHAS:-0.25,0.5,1,2}" --methods saif --coefficient mean --limit "$limit" \
      --max-new-tokens $tokens --out "$out/findings/$key/coefficient-mean"
    # The two rankings of latents: by activation difference (SAIF) and by effect on the answer (Arad et al.).
    if part rank; then
      for rank in delta output; do
        echo "+ saif eval --rank $rank" >&2
        "$saif" eval --model "$model" --instruction translate-fr --method saif --rank "$rank" --contents "$heldout" \
          --max-new-tokens $tokens --seed 0 --json >"$out/findings/$key/rank-$rank.json"
      done
    fi
  done
fi

if [ "$stage" = all ] || [ "$stage" = tables ]; then
  for spec in "${models[@]}"; do
    read -r file key _ _ _ <<<"$spec"
    run table --model "$SAIF_MODELS/$file" --limit "$table_limit" --max-new-tokens $tokens --out "$out"
  done
fi

if [ "$stage" = all ] || [ "$stage" = report ]; then
  python3 scripts/results.py report
fi
