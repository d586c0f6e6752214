#!/usr/bin/env python3
"""Writes the small random GGUF fixtures in crates/engine/tests/fixtures/ and their reference outputs.

Dev-only: run it once when the fixtures change, in a throwaway virtual environment (never in CI):

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch transformers gguf numpy
    /tmp/refenv/bin/python scripts/dev/make_fixtures.py

Each fixture is a tiny model of one architecture (Gemma 3, Gemma 2, Llama) with random weights stored in every
quantization the engine reads. The reference outputs come from an implementation independent of the engine:
the GGUF blocks are dequantized by gguf-py (numpy), loaded into Hugging Face transformers' own model classes
(Gemma3ForCausalLM, Gemma2ForCausalLM, LlamaForCausalLM) in float32 with eager attention, and run there.
The sliding windows are tiny (4 tokens) so the 12-token prompts cross them; Gemma 2's softcaps are small so they
bend the scores.
"""

import json
import os
import sys

import numpy as np
import torch
import gguf
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize, dequantize

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "engine", "tests", "fixtures")
VOCAB = 320
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K]


def random_kquant_blocks(rng, qtype, n_blocks):
    """Random K-quant blocks with scales chosen so values land around +-0.1 (gguf-py cannot quantize these)."""
    if qtype == Q.Q4_K:  # d f16, dmin f16, scales[12] (6-bit scales and mins), qs[128]
        b = rng.integers(0, 256, size=(n_blocks, 144), dtype=np.uint8)
        b[:, 0:2] = np.frombuffer(np.float16(2.0e-4).tobytes(), np.uint8)
        b[:, 2:4] = np.frombuffer(np.float16(1.5e-3).tobytes(), np.uint8)
        return b
    if qtype == Q.Q6_K:  # ql[128], qh[64], scales[16] (int8), d f16
        b = rng.integers(0, 256, size=(n_blocks, 210), dtype=np.uint8)
        b[:, 208:210] = np.frombuffer(np.float16(5.0e-5).tobytes(), np.uint8)
        return b
    raise ValueError(qtype)


def make_weight(rng, rows, cols, qtype, std=0.08):
    """Returns (raw array to store, float32 matrix as the reference sees it)."""
    if qtype in (Q.Q4_K, Q.Q6_K):
        size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        raw = random_kquant_blocks(rng, qtype, rows * cols // size).reshape(rows, cols // size * type_size)
    else:
        w = (rng.standard_normal((rows, cols)) * std).astype(np.float32)
        raw = w if qtype == Q.F32 else quantize(w, qtype)
    ref = raw if qtype == Q.F32 else dequantize(raw, qtype)
    return raw, np.asarray(ref, dtype=np.float32).reshape(rows, cols)


def spm_vocab():
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [3] * len(tokens)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["▁t", "he", "▁the", "in", "er", "an", "▁a"]
    pieces += [f"▁w{i}" for i in range(VOCAB - len(tokens) - len(pieces))]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 262 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def gpt2_vocab():
    # GPT-2's printable stand-ins for the 256 byte values.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_chars = [chr(c) for c in cs]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_chars
    merges = ["Ġ t", "h e", "Ġt he", "i n", "e r"]
    tokens += ["Ġt", "he", "Ġthe", "in", "er"]
    extra = VOCAB - len(tokens)
    for i in range(extra):
        a, b = byte_chars[33 + i % 26], byte_chars[33 + (i // 26) % 26]
        if a + b in tokens:
            tokens.append(f"<extra_{i}>")
            continue
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, merges, types


class Fixture:
    def __init__(self, name, arch, seed, hidden, heads, kv_heads, head_dim, ffn, layers, **extra):
        self.name, self.arch, self.rng = name, arch, np.random.default_rng(seed)
        self.hidden, self.heads, self.kv_heads, self.head_dim = hidden, heads, kv_heads, head_dim
        self.ffn, self.layers, self.extra = ffn, layers, extra
        self.type_cycle = 0
        self.tensors = {}  # name -> (raw, qtype)
        self.ref = {}  # name -> float32 array in GGUF layout

    def next_type(self):
        # Every type once, then only the block quantizations (float matrices make the files large).
        n = self.type_cycle
        self.type_cycle += 1
        return TYPES[n] if n < len(TYPES) else TYPES[3 + (n - len(TYPES)) % (len(TYPES) - 3)]

    def matrix(self, name, rows, cols, qtype=None):
        qtype = qtype or self.next_type()
        raw, ref = make_weight(self.rng, rows, cols, qtype)
        self.tensors[name] = (raw, qtype)
        self.ref[name] = ref

    def norm(self, name, n):
        w = (1.0 + 0.2 * self.rng.standard_normal(n)).astype(np.float32)
        self.tensors[name] = (w, Q.F32)
        self.ref[name] = w

    def build(self, embedding_type):
        h, qd, kd = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.matrix("token_embd.weight", VOCAB, h, embedding_type)
        gemma = self.arch != "llama"
        for i in range(self.layers):
            p = f"blk.{i}."
            self.norm(p + "attn_norm.weight", h)
            self.matrix(p + "attn_q.weight", qd, h)
            self.matrix(p + "attn_k.weight", kd, h)
            self.matrix(p + "attn_v.weight", kd, h)
            self.matrix(p + "attn_output.weight", h, qd)
            if self.arch == "gemma3":
                self.norm(p + "attn_q_norm.weight", self.head_dim)
                self.norm(p + "attn_k_norm.weight", self.head_dim)
            if gemma:
                self.norm(p + "post_attention_norm.weight", h)
                self.norm(p + "post_ffw_norm.weight", h)
            self.norm(p + "ffn_norm.weight", h)
            self.matrix(p + "ffn_gate.weight", self.ffn, h)
            self.matrix(p + "ffn_up.weight", self.ffn, h)
            self.matrix(p + "ffn_down.weight", h, self.ffn)
        self.norm("output_norm.weight", h)

    def write_gguf(self, path):
        w = gguf.GGUFWriter(path, self.arch)
        a = self.arch
        w.add_name(f"fixture {self.name}")
        w.add_uint32(f"{a}.context_length", 64)
        w.add_uint32(f"{a}.embedding_length", self.hidden)
        w.add_uint32(f"{a}.block_count", self.layers)
        w.add_uint32(f"{a}.feed_forward_length", self.ffn)
        w.add_uint32(f"{a}.attention.head_count", self.heads)
        w.add_uint32(f"{a}.attention.head_count_kv", self.kv_heads)
        w.add_uint32(f"{a}.attention.key_length", self.head_dim)
        w.add_uint32(f"{a}.attention.value_length", self.head_dim)
        w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", self.extra["eps"])
        w.add_float32(f"{a}.rope.freq_base", self.extra["rope_base"])
        if "window" in self.extra:
            w.add_uint32(f"{a}.attention.sliding_window", self.extra["window"])
        if a == "gemma2":
            w.add_float32(f"{a}.attn_logit_softcapping", self.extra["attn_softcap"])
            w.add_float32(f"{a}.final_logit_softcapping", self.extra["final_softcap"])
        if a == "llama":
            tokens, merges, types = gpt2_vocab()
            w.add_string("tokenizer.ggml.model", "gpt2")
            w.add_string("tokenizer.ggml.pre", "smollm")
            w.add_array("tokenizer.ggml.tokens", tokens)
            w.add_array("tokenizer.ggml.token_type", types)
            w.add_array("tokenizer.ggml.merges", merges)
            w.add_uint32("tokenizer.ggml.bos_token_id", 1)
            w.add_uint32("tokenizer.ggml.eos_token_id", 2)
            w.add_bool("tokenizer.ggml.add_bos_token", False)
        else:
            tokens, scores, types = spm_vocab()
            w.add_string("tokenizer.ggml.model", "llama")
            w.add_array("tokenizer.ggml.tokens", tokens)
            w.add_array("tokenizer.ggml.scores", scores)
            w.add_array("tokenizer.ggml.token_type", types)
            w.add_uint32("tokenizer.ggml.bos_token_id", 2)
            w.add_uint32("tokenizer.ggml.eos_token_id", 1)
            w.add_uint32("tokenizer.ggml.unknown_token_id", 3)
            w.add_bool("tokenizer.ggml.add_bos_token", True)
            w.add_bool("tokenizer.ggml.add_space_prefix", False)
        for name, (raw, qtype) in self.tensors.items():
            w.add_tensor(name, raw, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    def hf_model(self):
        from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig
        from transformers import LlamaConfig, LlamaForCausalLM

        common = dict(
            vocab_size=VOCAB, hidden_size=self.hidden, intermediate_size=self.ffn, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
            rms_norm_eps=self.extra["eps"], tie_word_embeddings=True, max_position_embeddings=64,
            attn_implementation="eager", torch_dtype=torch.float32, bos_token_id=None, eos_token_id=None,
            pad_token_id=None,
        )
        if self.arch == "gemma3":
            cfg = Gemma3TextConfig(
                **common, sliding_window=self.extra["window"], query_pre_attn_scalar=self.head_dim,
                hidden_activation="gelu_pytorch_tanh",
                rope_parameters={
                    "full_attention": {"rope_theta": self.extra["rope_base"], "rope_type": "default"},
                    "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
                },
                layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.layers)],
            )
            model = Gemma3ForCausalLM(cfg)
        elif self.arch == "gemma2":
            cfg = Gemma2Config(
                **common, sliding_window=self.extra["window"], query_pre_attn_scalar=self.head_dim,
                attn_logit_softcapping=self.extra["attn_softcap"], final_logit_softcapping=self.extra["final_softcap"],
                hidden_activation="gelu_pytorch_tanh",
                rope_parameters={"rope_theta": self.extra["rope_base"], "rope_type": "default"},
                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.layers)],
            )
            model = Gemma2ForCausalLM(cfg)
        else:
            cfg = LlamaConfig(**common, rope_parameters={"rope_theta": self.extra["rope_base"], "rope_type": "default"})
            model = LlamaForCausalLM(cfg)
        model.eval()

        gemma = self.arch != "llama"
        norm_shift = 1.0 if gemma else 0.0  # GGUF stores Gemma's (1 + w); HF keeps w

        def unpermute(w, n_head):
            # llama.cpp's converter permutes Llama's q/k rows into RoPE-interleaved order; undo it for HF.
            return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

        sd = {"model.embed_tokens.weight": self.ref["token_embd.weight"],
              "model.norm.weight": self.ref["output_norm.weight"] - norm_shift}
        names = {"attn_norm": "input_layernorm", "ffn_norm": "pre_feedforward_layernorm" if gemma else "post_attention_layernorm",
                 "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                 "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
        mats = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
        for i in range(self.layers):
            for g, hf in names.items():
                key = f"blk.{i}.{g}.weight"
                if key in self.ref:
                    sd[f"model.layers.{i}.{hf}.weight"] = self.ref[key] - norm_shift
            for g, hf in mats.items():
                w = self.ref[f"blk.{i}.{g}.weight"]
                if self.arch == "llama" and g == "attn_q":
                    w = unpermute(w, self.heads)
                if self.arch == "llama" and g == "attn_k":
                    w = unpermute(w, self.kv_heads)
                sd[f"model.layers.{i}.{hf}.weight"] = w
        sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [m for m in missing if "rotary" not in m]
        assert not missing and not unexpected, (missing, unexpected)
        return model

    def references(self, model, prompts):
        captured = {}
        hooks = [layer.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out))
                 for i, layer in enumerate(model.model.layers)]
        cases = []
        with torch.no_grad():
            for ids in prompts:
                out = model(torch.tensor([ids]), use_cache=False)
                logits = out.logits[0, -1].double().numpy()
                resid = {str(i): {"norm": float(captured[i][0, -1].double().norm()),
                                  "first8": [float(x) for x in captured[i][0, -1, :8]]} for i in range(self.layers)}
                greedy, seq = [], list(ids)
                for _ in range(8):
                    nxt = int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
                    greedy.append(nxt)
                    seq.append(nxt)
                cases.append({"input_ids": ids, "last_logits": [round(float(x), 6) for x in logits],
                              "resid_post_last_token": resid, "greedy8_ids": greedy})
        for h in hooks:
            h.remove()
        return cases


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    specs = [
        ("tiny-gemma3", "gemma3", 3, dict(hidden=256, heads=2, kv_heads=1, head_dim=128, ffn=256, layers=6,
                                          eps=1e-6, rope_base=1_000_000.0, window=4), Q.Q6_K),
        ("tiny-gemma2", "gemma2", 2, dict(hidden=256, heads=2, kv_heads=1, head_dim=128, ffn=256, layers=4,
                                          eps=1e-6, rope_base=10_000.0, window=4, attn_softcap=3.0,
                                          final_softcap=5.0), Q.F16),
        ("tiny-llama", "llama", 1, dict(hidden=256, heads=4, kv_heads=2, head_dim=64, ffn=256, layers=3,
                                        eps=1e-5, rope_base=10_000.0), Q.Q4_1),
    ]
    rng = np.random.default_rng(42)
    prompts = [[int(x) for x in rng.integers(6, VOCAB, size=n)] for n in (1, 5, 12)]
    for name, arch, seed, dims, emb in specs:
        f = Fixture(name, arch, seed, **{k: dims[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "ffn", "layers")},
                    **{k: v for k, v in dims.items() if k not in ("hidden", "heads", "kv_heads", "head_dim", "ffn", "layers")})
        f.build(emb)
        path = os.path.join(OUT, f"{name}.gguf")
        f.write_gguf(path)
        model = f.hf_model()
        ps = [[2] + p for p in prompts] if arch != "llama" else prompts
        cases = f.references(model, ps)
        types = sorted({gguf.GGMLQuantizationType(q).name for _, q in f.tensors.values()})
        meta = {"architecture": arch, "reference": f"transformers {__import__('transformers').__version__} "
                f"{type(model).__name__}, float32, eager attention, weights dequantized by gguf-py {gguf.__file__.split('/')[-2]}",
                "tensor_types": types, "how_to_read": "last_logits = all next-token logits after the last input id; "
                "resid_post_last_token[L] = hidden state leaving layer L at the last input id (no final norm); "
                "greedy8_ids = 8 greedy tokens recomputed without a cache"}
        with open(os.path.join(OUT, f"{name}.json"), "w") as fh:
            json.dump({"meta": meta, "cases": cases}, fh, indent=1)
        print(name, os.path.getsize(path), "bytes", types, file=sys.stderr)


if __name__ == "__main__":
    main()
