#!/usr/bin/env python3
"""Reads the sweeps of scripts/results.sh (docs/results/) and
  layer KEY                 prints the layer SAIF steers translate-fr best at (on the tuning contents);
  layer-alphas KEY LAYER    prints the best SAIF and difference-in-means alphas for translate-fr at LAYER;
  defaults KEY              records the best settings of every instruction in crates/saif/data/steering.json;
  report                    writes docs/results/report.md: the tables and charts docs/results.md shows.

The rule for "best" (on the 40 tuning contents, never the held-out ones): the highest loose accuracy among the
strengths whose outputs repeat themselves less than half of the time (mean repetition < 0.5: a loop of one word is
not following an instruction, even when a checker passes it), then the higher strict accuracy, then the smaller
strength.
"""
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "results")
STEERING = os.path.join(ROOT, "crates", "saif", "data", "steering.json")
INSTRUCTIONS = ["translate-fr", "translate-es", "translate-de", "summarize", "include-word", "uppercase"]
K = 15


def rows(path):
    return json.load(open(path))["rows"] if os.path.exists(path) else []


def best(candidates):
    fluent = [r for r in candidates if r["repetition"] < 0.5] or candidates
    return max(fluent, key=lambda r: (r["loose"], r["strict"], -float(r["value"]))) if fluent else None


def tuned(key, layer, instruction, method):
    folder = os.path.join(OUT, "tune", key, f"layer_{layer}")
    if method == "diffmean":
        folder = os.path.join(folder, "diffmean")
    return rows(os.path.join(folder, f"sweep-{instruction}-alpha.json"))


def layers(key):
    return sorted(int(os.path.basename(d)[6:]) for d in glob.glob(os.path.join(OUT, "tune", key, "layer_*")))


def best_layer(key):
    scored = [(best(tuned(key, l, "translate-fr", "saif")), l) for l in layers(key)]
    scored = [(r, l) for r, l in scored if r]
    # The best loose accuracy; on ties the deeper layer (the paper's claim is the last).
    return max(scored, key=lambda x: (x[0]["loose"], x[0]["strict"], x[1]))[1]


def defaults(key):
    layer = best_layer(key)
    entries = {}
    for instruction in INSTRUCTIONS:
        s, d = best(tuned(key, layer, instruction, "saif")), best(tuned(key, layer, instruction, "diffmean"))
        if s and d:
            entries[instruction] = {"layer": layer, "alpha": float(s["value"]), "k": K, "diffmean_alpha": float(d["value"])}
    entries["*"] = entries["translate-fr"]
    data = json.load(open(STEERING))
    data["models"][key] = entries
    with open(STEERING, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"{key}: layer {layer}; " + ", ".join(f"{i} alpha {e['alpha']} / {e['diffmean_alpha']}" for i, e in entries.items()))


def pct(p, ci):
    return f"{100 * p:.0f}% [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def eval_row(report):
    return f"{pct(report['loose'], report['loose_ci'])} | {pct(report['strict'], report['strict_ci'])} | " \
           f"{report['fluency']['perplexity']:.1f} | {report['fluency']['repetition']:.2f}"


def tuning_sections(key):
    """The tuning grid of translate-fr, and each layer at its best strength (models with a tune/KEY folder)."""
    lines = []
    first = tuned(key, layers(key)[0], "translate-fr", "saif")
    n = first[0]["n"] if first else 0
    lines.append(f"### {key}: tuning grid (translate-fr, {n} discovery contents): loose accuracy (perplexity, repetition)\n")
    lines.append("| layer | " + " | ".join(f"saif α={r['value']}" for r in tuned(key, layers(key)[0], "translate-fr", "saif"))
                 + " | " + " | ".join(f"diffmean α={r['value']}" for r in tuned(key, layers(key)[0], "translate-fr", "diffmean")) + " |")
    n = len(tuned(key, layers(key)[0], "translate-fr", "saif")) + len(tuned(key, layers(key)[0], "translate-fr", "diffmean"))
    lines.append("|---|" + "---|" * n)
    for l in layers(key):
        cells = [f"{100 * r['loose']:.0f}% ({r['perplexity']:.0f}, {r['repetition']:.2f})" for r in tuned(key, l, "translate-fr", "saif") + tuned(key, l, "translate-fr", "diffmean")]
        lines.append(f"| {l} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"### {key}: each layer at its best strength (the rule above; translate-fr, {first[0]['n'] if first else 0} discovery contents)\n")
    lines.append("| layer | method | α | loose (95% CI) | strict (95% CI) | perplexity | repetition |")
    lines.append("|---|---|---|---|---|---|---|")
    for l in layers(key):
        for method in ["saif", "diffmean"]:
            r = best(tuned(key, l, "translate-fr", method))
            if r:
                lines.append(f"| {l} | {method} | {r['value']} | {pct(r['loose'], r['loose_ci'])} | {pct(r['strict'], r['strict_ci'])} | {r['perplexity']:.1f} | {r['repetition']:.2f} |")
    lines.append("")
    return lines


def report():
    lines = []
    # Every model with a tuning grid or a full table (the pretrained Gemma has only the table).
    keys = set(os.listdir(os.path.join(OUT, "tune"))) if os.path.isdir(os.path.join(OUT, "tune")) else set()
    keys |= {os.path.basename(p)[len("table-"):-len(".json")] for p in glob.glob(os.path.join(OUT, "table-*.json"))}
    for key in sorted(keys):
        if os.path.isdir(os.path.join(OUT, "tune", key)):
            lines += tuning_sections(key)
        findings = os.path.join(OUT, "findings", key)
        layer_files = sorted(glob.glob(os.path.join(findings, "layer-*-saif.json")), key=lambda p: int(p.split("layer-")[1].split("-")[0]))
        if layer_files:
            n = json.load(open(layer_files[0]))["n"]
            lines.append(f"### {key}: the layer (translate-fr, {n} held-out contents, each layer at its tuned α)\n")
            lines.append("| layer | method | α | loose (95% CI) | strict (95% CI) | perplexity | repetition |")
            lines.append("|---|---|---|---|---|---|---|")
            for path in layer_files:
                layer = int(path.split("layer-")[1].split("-")[0])
                for method in ["saif", "diffmean"]:
                    r = json.load(open(path.replace("-saif.json", f"-{method}.json")))
                    lines.append(f"| {layer} | {method} | {r['alpha']} | {eval_row(r)} |")
            lines.append("")
        # The k and placement findings, on every instruction they were run for (translate-fr by default).
        for instruction, param in [(i, p) for i in INSTRUCTIONS for p in ["k", "placement"]]:
            sweep = rows(os.path.join(findings, f"sweep-{instruction}-{param}.json"))
            if sweep:
                lines.append(f"### {key}: {param} ({instruction}, {sweep[0]['n']} held-out contents)\n")
                lines.append(f"| {param} | method | loose (95% CI) | strict (95% CI) | perplexity | repetition |")
                lines.append("|---|---|---|---|---|---|")
                for r in sweep:
                    lines.append(f"| {r['value']} | {r['method']} | {pct(r['loose'], r['loose_ci'])} | {pct(r['strict'], r['strict_ci'])} | {r['perplexity']:.1f} | {r['repetition']:.2f} |")
                lines.append("")
        mean = rows(os.path.join(findings, "coefficient-mean", "sweep-translate-fr-alpha.json"))
        if mean:
            lines.append(f"### {key}: the paper's coefficient, each latent's mean activation with the instruction (translate-fr, {mean[0]['n']} held-out contents)\n")
            lines.append("| α | loose (95% CI) | strict (95% CI) | perplexity | repetition |")
            lines.append("|---|---|---|---|---|")
            for r in mean:
                lines.append(f"| {r['value']} | {pct(r['loose'], r['loose_ci'])} | {pct(r['strict'], r['strict_ci'])} | {r['perplexity']:.1f} | {r['repetition']:.2f} |")
            lines.append("")
        ranks = [(rank, os.path.join(findings, f"rank-{rank}.json")) for rank in ["delta", "output"]]
        if all(os.path.exists(p) for _, p in ranks):
            lines.append(f"### {key}: ranking latents by activation difference or by effect on the answer (translate-fr, held out)\n")
            lines.append("| ranking | loose (95% CI) | strict (95% CI) | perplexity | repetition | latents |")
            lines.append("|---|---|---|---|---|---|")
            for rank, path in ranks:
                r = json.load(open(path))
                lines.append(f"| {rank} | {eval_row(r)} | {', '.join(map(str, r.get('latents', [])))} |")
            lines.append("")
        # The tables: the full one (one `saif table` run over every instruction, docs/results/table-KEY.json), and
        # the smaller one run per instruction (docs/results/table/INSTRUCTION/table-KEY.json), each under its own
        # heading: they differ in contents and discovery, so their rows are not pooled.
        per_instruction = sorted(glob.glob(os.path.join(OUT, "table", "*", f"table-{key}.json")),
                                 key=lambda p: INSTRUCTIONS.index(p.split(os.sep)[-2]) if p.split(os.sep)[-2] in INSTRUCTIONS else 99)
        for title, tables in (("every method on every instruction", [os.path.join(OUT, f"table-{key}.json")]),
                              ("every method on every instruction, run per instruction", per_instruction)):
            table_rows, seconds = [], 0.0
            for path in tables:
                if os.path.exists(path):
                    t = json.load(open(path))
                    table_rows += t["rows"]
                    seconds += t["seconds"]
            if not table_rows:
                continue
            lines.append(f"### {key}: {title} ({table_rows[0]['n']} held-out contents; {seconds / 60:.0f} minutes on 2 cores)\n")
            lines.append("| instruction | method | layer | α | loose (95% CI) | strict (95% CI) | perplexity | repetition |")
            lines.append("|---|---|---|---|---|---|---|---|")
            for r in table_rows:
                steers = r["method"] not in ("none", "prompt")
                lines.append(f"| {r['instruction']} | {r['method']} | {r['layer'] if steers else ''} | {r['value'] if steers else ''} | "
                             f"{pct(r['loose'], r['loose_ci'])} | {pct(r['strict'], r['strict_ci'])} | {r['perplexity']:.1f} | {r['repetition']:.2f} |")
            lines.append("")
    with open(os.path.join(OUT, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {os.path.join(OUT, 'report.md')}")


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "report"
    if command == "layer":
        print(best_layer(sys.argv[2]))
    elif command == "layer-alphas":
        key, layer = sys.argv[2], int(sys.argv[3])
        s, d = best(tuned(key, layer, "translate-fr", "saif")), best(tuned(key, layer, "translate-fr", "diffmean"))
        print(s["value"], d["value"])
    elif command == "defaults":
        defaults(sys.argv[2])
    else:
        report()
