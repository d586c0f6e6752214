#!/usr/bin/env python3
"""Writes public/saes/index.json: for every model key, the layers with a shipped SAE and each file's size and
sha256, so that the page checks what it downloads (and what its cache holds) against them.

    python3 scripts/sae_index.py      (make saes runs it after training)
"""
import hashlib
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAES = os.path.join(ROOT, "public", "saes")

index = {}
for key in sorted(os.listdir(SAES)):
    folder = os.path.join(SAES, key)
    if not os.path.isdir(folder):
        continue
    layers = sorted(int(d[6:]) for d in os.listdir(folder) if d.startswith("layer_"))
    files = {}
    for layer in layers:
        entry = {}
        for name in ("params.safetensors", "config.json", "lens.json"):
            path = os.path.join(folder, f"layer_{layer}", name)
            if os.path.exists(path):
                data = open(path, "rb").read()
                entry[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        files[f"layer_{layer}"] = entry
    index[key] = {"layers": layers, "files": files}
with open(os.path.join(SAES, "index.json"), "w") as f:
    json.dump(index, f, indent=1)
print("public/saes/index.json:", {k: v["layers"] for k, v in index.items()})
