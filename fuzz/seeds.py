#!/usr/bin/env python3
"""Writes the fuzz targets' committed seeds into fuzz/corpus/<target>/ (run once; the files are in git).

The GGUF target's seeds are the engine's fixture models, copied in by scripts/fuzz.sh, so they are not repeated
here. The SAE seeds are tiny SAEs (4 inputs, 8 latents) in every dtype and architecture the readers accept, with
configs shaped like the shipped ones and like SAELens'; each input is framed as saif_app::untrusted::split_pair
reads it: a little-endian u32 length, the config, then the weights.
"""
import json, os, struct

here = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data, under="corpus"):
    os.makedirs(os.path.join(here, under, target), exist_ok=True)
    with open(os.path.join(here, under, target, name), "wb") as f:
        f.write(data)


def pair(config, weights):
    config = json.dumps(config).encode()
    return struct.pack("<I", len(config)) + config + weights


def encode(values, dtype):
    if dtype == "F32":
        return struct.pack(f"<{len(values)}f", *values)
    if dtype == "F16":
        return struct.pack(f"<{len(values)}e", *values)
    # BF16: the top half of each f32
    return b"".join(struct.pack("<f", v)[2:] for v in values)


def safetensors(tensors, dtype):
    header, data = {}, b""
    for name, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        blob = encode([((i * 7919) % 13 - 6) / 8 for i in range(n)], dtype)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


d_in, d_sae = 4, 8
for dtype in ["F32", "F16", "BF16"]:
    scope = [("w_enc", [d_in, d_sae]), ("w_dec", [d_sae, d_in]), ("b_enc", [d_sae]), ("b_dec", [d_in])]
    write("sae_gemma_scope", f"topk-{dtype}", pair(
        {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": 2, "hook": "resid_post", "layer": 3,
         "model_name": "smollm2-135m"}, safetensors(scope, dtype)))
    write("sae_gemma_scope", f"jumprelu-{dtype}", pair(
        {"architecture": "jump_relu", "layer": 1}, safetensors(scope + [("threshold", [d_sae])], dtype)))
    lens = [("W_enc", [d_in, d_sae]), ("W_dec", [d_sae, d_in]), ("b_enc", [d_sae]), ("b_dec", [d_in])]
    write("sae_lens", f"standard-{dtype}", pair(
        {"architecture": "standard", "hook_name": "blocks.2.hook_resid_post", "model_name": "gemma-3-270m",
         "apply_b_dec_to_input": True}, safetensors(lens, dtype)))
    write("sae_lens", f"topk-{dtype}", pair(
        {"architecture": "topk", "activation_fn_kwargs": {"k": 3}, "hook_name": "blocks.0.hook_resid_post"},
        safetensors(lens, dtype)))
    write("sae_lens", f"jumprelu-{dtype}", pair(
        {"architecture": "jumprelu", "hook_name": "blocks.5.hook_resid_post"},
        safetensors(lens + [("threshold", [d_sae])], dtype)))

write("lens_json", "three", bytes([3]) + json.dumps(
    {"about": "each latent's top tokens", "top_tokens": [[" la", " le"], ["é", "\u00a0"], []]}).encode())
write("lens_json", "empty", bytes([0]) + b'{"top_tokens": []}')

links = {
    "default": "?model=smollm2-135m-instruct&text=Translate+into+French%3A+The+weather+is+nice+today.&chat=1&greedy=1&seed=1&backend=auto",
    "steered": "?model=gemma-3-270m&sae=9&steer=12:40.5,7:-3&mult=2&scope=generated&text=Hello&chat=0&greedy=0&temp=0.7&seed=42&backend=cpu",
    "preset": "?sae=gemmascope2-res-9-16k&text=Bonjour",
    "url": "?model=https%3A%2F%2Fexample.org%2Fm.gguf&backend=webgpu",
    "hostile": "?model=javascript:alert(1)&text=%E2%82&colour=red&backend=tpu&chat=yes&model=http://localhost@evil.com/x.gguf",
}
for name, query in links.items():
    write("link", name, query.encode())

# Inputs that once got past a check, kept as regression cases in fuzz/regressions/<target>/ (crashes the fuzzer
# finds land there too, by scripts/fuzz.sh's -artifact_prefix). Each must give an error, never a panic.
def regression(target, name, data):
    write(target, name, data, under="regressions")


def gguf_header_with_entry(key, value):
    key = key.encode()
    return b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, len(key)) + key + value


# The two crafted headers that aborted `saif info` (issue 11): a string claiming 2^61 bytes, an array of 2^60 u32s.
regression("gguf", "string-of-2-to-the-61-bytes",
           gguf_header_with_entry("general.name", struct.pack("<IQ", 8, 1 << 61) + b"only a few bytes follow"))
regression("gguf", "array-of-2-to-the-60-elements",
           gguf_header_with_entry("tokenizer.ggml.tokens", struct.pack("<IIQ", 9, 4, 1 << 60) + bytes(64)))
# A weight matrix with an empty dimension takes no bytes, so the biases' length came from the header alone:
# [0, 2^30] asked for a 4 GiB b_enc.
empty = [("w_enc", [0, 1 << 30]), ("w_dec", [1 << 30, 0])]
regression("sae_gemma_scope", "empty-dimension", pair({"architecture": "relu"}, safetensors(empty, "F32")))
regression("sae_lens", "empty-dimension",
           pair({"architecture": "standard"}, safetensors([("W_enc", [0, 1 << 30]), ("W_dec", [1 << 30, 0])], "F32")))
# A k beyond 32 bits, which wasm's usize wrapped to 1.
regression("sae_gemma_scope", "k-beyond-32-bits", pair(
    {"architecture": "topk", "k": (1 << 32) + 1},
    safetensors([("w_enc", [d_in, d_sae]), ("w_dec", [d_sae, d_in])], "F32")))
regression("lens_json", "fewer-latents-than-the-sae", bytes([5]) + b'{"top_tokens": [["a"]]}')
