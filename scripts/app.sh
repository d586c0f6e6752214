#!/usr/bin/env bash
# Builds (`build`) or serves (`serve`) the page with trunk. The offline models are linked into public/models,
# which index.html copies into dist/models: the page's embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

mkdir -p public/models
for f in "$SAIF_MODELS"/*.gguf; do
  [ -e "$f" ] && ln -sfn "$f" "public/models/$(basename "$f")"
done

use_wasm_toolchain
case "${1:-build}" in
  build)
    trunk build --release
    ;;
  serve)
    echo "==> serving on http://127.0.0.1:8080 (Ctrl-C to stop; the first build takes several minutes)"
    trunk serve --release
    ;;
  *)
    echo "usage: scripts/app.sh build|serve" >&2
    exit 2
    ;;
esac
