#!/usr/bin/env python3
"""Writes crates/engine/tests/reference/*.json: more reference outputs of the two offline GGUFs, for prompts
../shared/golden does not have (other languages, code, chat turns, and prompts longer than Gemma 3's 512-token
sliding window, which the golden prompts never reach).

Dev-only, like make_fixtures.py (same throwaway environment, never in CI):

    /tmp/refenv/bin/python scripts/dev/make_references.py

The reference is Hugging Face transformers loading the same GGUF (its own GGUF reader dequantizes the weights to
float32), run with eager attention; the fields are those of ../shared/golden.
"""

import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

MODELS = os.environ.get("SAIF_MODELS", os.path.expanduser("~/.cache/saif/models"))
OUT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "engine", "tests", "reference")

STORY = (
    "The harbour town woke slowly. Fishermen checked their nets, the baker opened his shutters, and children ran "
    "along the sea wall chasing gulls. Every morning the same routine, every evening the same tired walk home. "
)

PROMPTS = {
    "gemma-3-270m-q4_k_m.gguf": [
        "Water boils at a temperature of",
        "El perro corre por el parque y",
        "import numpy as np\n\ndef mean(xs):\n    return",
        "<start_of_turn>user\nName three colours.<end_of_turn>\n<start_of_turn>model\n",
        STORY * 14 + "When the storm finally came, the",  # about 600 tokens: beyond the 512 window
    ],
    "SmolLM2-135M-Instruct.Q4_1.gguf": [
        "Water boils at a temperature of",
        "Der Hund läuft durch den Park und",
        "<|im_start|>user\nSummarize: The cat sat on the mat all day long.<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nWrite a haiku about rain.<|im_end|>\n<|im_start|>assistant\n",
        STORY * 14 + "When the storm finally came, the",
    ],
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for file, prompts in PROMPTS.items():
        tok = AutoTokenizer.from_pretrained(MODELS, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(MODELS, gguf_file=file, dtype=torch.float32,
                                                     attn_implementation="eager")
        model.eval()
        n_layers = model.config.num_hidden_layers
        layers = sorted({0, n_layers // 3, 2 * n_layers // 3, n_layers - 1})
        captured = {}
        for i in layers:
            model.model.layers[i].register_forward_hook(
                lambda mod, inp, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        bos = tok.bos_token_id if file.startswith("gemma") else None
        eos = model.config.eos_token_id
        cases = []
        with torch.no_grad():
            for prompt in prompts:
                ids = tok.encode(prompt, add_special_tokens=False)
                if bos is not None:
                    ids = [bos] + ids
                out = model(torch.tensor([ids]), use_cache=False)
                logits = out.logits[0, -1]
                top = torch.topk(logits, 10)
                resid = {str(i): {"norm": float(captured[i][0, -1].double().norm()),
                                  "first8": [round(float(x), 5) for x in captured[i][0, -1, :8]]} for i in layers}
                seq, greedy = list(ids), []
                for _ in range(16):
                    nxt = int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
                    greedy.append(nxt)
                    seq.append(nxt)
                    if nxt == eos:
                        break
                cases.append({"prompt": prompt, "input_ids": ids, "top10_ids": [int(i) for i in top.indices],
                              "top10_logits": [round(float(v), 4) for v in top.values],
                              "resid_post_last_token": resid, "greedy16_ids": greedy})
                print(file, len(ids), "tokens:", repr(prompt[:40]), file=sys.stderr)
        meta = {"model_file": file, "reference": f"transformers {transformers.__version__} {type(model).__name__} "
                "loading the GGUF itself (weights dequantized to float32), eager attention, torch "
                f"{torch.__version__} CPU", "bos_prepended": bos is not None, "layers": layers,
                "how_to_read": "as ../shared/golden: input_ids as the model is fed (BOS where the GGUF asks); "
                "top10 after the last prompt token; resid_post_last_token[L] leaves layer L, no final norm; "
                "greedy16 stops after EOS, which is included"}
        name = file.replace(".gguf", ".json")
        with open(os.path.join(OUT, name), "w") as fh:
            json.dump({"meta": meta, "prompts": cases}, fh, indent=1)


if __name__ == "__main__":
    main()
