#!/usr/bin/env python3
"""Assembles the SAE training corpus offline, from Debian packages and the project's own instruction phrasings.

    python3 scripts/corpus.py OUT_DIR      (make corpus; the packages come from scripts/sae.sh)

Writes OUT_DIR/train.txt and OUT_DIR/heldout.txt (one text per line, shuffled with a fixed seed) and
OUT_DIR/manifest.json (every source with its package, version, licence file, line count; the files' sha256).
A line starting with "[chat] " is a user turn: the trainer wraps it in the model's chat template.

Sources (see docs/corpus.md for the licences):
  - plain everyday English: WordNet's example sentences (package wordnet-base), the kind of sentence SAIF's contents
    are;
  - English prose: fortune quotations (package fortunes) and paragraphs of the Debian Reference (debian-reference-en);
  - French, Spanish, German prose: the Debian Reference's translations (debian-reference-fr/-es/-de), German and
    Spanish fortunes (fortunes-de, fortunes-es), and translated program messages from the machine's gettext
    catalogs (/usr/share/locale/{fr,es,de}), each beside its English original;
  - SAIF prompts: the project's discovery contents (crates/saif/data/contents-discovery.txt; never the held-out
    ones), alone (negatives) and followed or preceded by an instruction of crates/saif/data/instructions.json in
    English, French, Spanish or German (positives). They are "[prompt] " lines, with "\\n" for a line break: the
    trainer feeds them as SAIF feeds a model (a chat turn for an instruction-tuned model, plain text otherwise).
Held out: every text whose hash falls in the last tenth, so the split is stable as sources change.
"""

import gettext
import glob
import hashlib
import html.parser
import json
import os
import random
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORTUNES = "/usr/share/games/fortunes"
WORDNET = "/usr/share/wordnet"
REFERENCE = "/usr/share/debian-reference"


def package_version(name):
    try:
        return subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True).stdout
    except OSError:
        return ""


def clean(text):
    return re.sub(r"\s+", " ", text).strip()


def fortunes(folder):
    """Quotations of a fortune folder: one text each, without ascii art or attributions."""
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        if path.endswith((".dat", ".u8")) or os.path.isdir(path) or "art" in os.path.basename(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for quote in f.read().split("\n%\n"):
                lines = [l for l in quote.split("\n") if l.strip() and not l.strip().startswith(("--", "-- "))]
                text = clean(" ".join(lines))
                letters = sum(c.isalpha() for c in text)
                if 40 <= len(text) <= 400 and letters > 0.7 * len(text.replace(" ", "")):
                    out.append(text)
    return out


class Paragraphs(html.parser.HTMLParser):
    """The text of <p> elements of an HTML page."""

    def __init__(self):
        super().__init__()
        self.depth, self.buffer, self.paragraphs = 0, [], []

    def handle_starttag(self, tag, attrs):
        if tag == "p":
            self.depth += 1

    def handle_endtag(self, tag):
        if tag == "p" and self.depth:
            self.depth -= 1
            text = clean("".join(self.buffer))
            self.buffer = []
            if 60 <= len(text) <= 800:
                self.paragraphs.append(text)

    def handle_data(self, data):
        if self.depth:
            self.buffer.append(data)


def reference(lang):
    out = []
    for path in sorted(glob.glob(os.path.join(REFERENCE, f"*.{lang}.html"))):
        parser = Paragraphs()
        with open(path, encoding="utf-8", errors="replace") as f:
            parser.feed(f.read())
        out.extend(parser.paragraphs)
    return out


def catalogs(lang, limit):
    """Translated messages of the gettext catalogs, as "English — translation" pairs of whole sentences."""
    out = []
    for path in sorted(glob.glob(f"/usr/share/locale/{lang}/LC_MESSAGES/*.mo")):
        try:
            with open(path, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog
        except Exception:
            continue
        for source, target in catalog.items():
            if not isinstance(source, str) or not isinstance(target, str):
                continue
            s, t = clean(source), clean(target)
            if 30 <= len(t) <= 300 and s != t and "%" not in s and "\\" not in s and t.count(" ") >= 4:
                out.append(t)
                if len(out) >= limit:
                    return out
    return out


def wordnet_examples():
    """WordNet's example sentences ("the patient has trouble breathing"): plain, everyday English."""
    out = []
    for part in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(WORDNET, f"data.{part}"), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):
                    continue  # the licence header
                for example in re.findall(r'"([^"]+)"', line.split("|", 1)[-1]):
                    text = clean(example)
                    if len(text.split()) >= 5 and text[0].isalpha():
                        text = text[0].upper() + text[1:]
                        out.append(text if text[-1] in ".?!" else text + ".")
    return out


def saif_prompts(rng, count):
    """Discovery contents alone and with an instruction before or after them, as "[prompt] " lines."""
    spec = json.load(open(os.path.join(ROOT, "crates", "saif", "data", "instructions.json")))
    with open(os.path.join(ROOT, "crates", "saif", "data", "contents-discovery.txt"), encoding="utf-8") as f:
        contents = [l.strip() for l in f if l.strip()]
    phrasings = [p for i in spec["instructions"] for ps in i["phrasings"].values() for p in ps]
    out = []
    for i in range(count):
        content = contents[i % len(contents)]
        if i % 3 == 0:
            out.append("[prompt] " + content)  # no instruction: the negatives of SAIF
            continue
        instruction = rng.choice(phrasings).replace("{word}", rng.choice(spec["keywords"]))
        out.append("[prompt] " + (f"{content}\\n{instruction}" if i % 4 else f"{instruction}\\n{content}"))
    return out


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/saif/corpus")
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(20250215)
    english_quotes = fortunes(FORTUNES)
    sources = [
        ("WordNet example sentences (plain English)", "wordnet-base", wordnet_examples(), 14000),
        ("fortunes (English quotations)", "fortunes", english_quotes, 2500),
        ("Debian Reference, English", "debian-reference-en", reference("en"), 600),
        ("Debian Reference, French", "debian-reference-fr", reference("fr"), 600),
        ("Debian Reference, Spanish", "debian-reference-es", reference("es"), 400),
        ("Debian Reference, German", "debian-reference-de", reference("de"), 400),
        ("fortunes-de (German quotations)", "fortunes-de", fortunes(os.path.join(FORTUNES, "de")), 1200),
        ("fortunes-es (Spanish quotations)", "fortunes-es", fortunes(os.path.join(FORTUNES, "es")), 1200),
        ("gettext catalogs, French", "(catalogs of the installed packages)", catalogs("fr", 1500), 1500),
        ("gettext catalogs, Spanish", "(catalogs of the installed packages)", catalogs("es", 600), 600),
        ("gettext catalogs, German", "(catalogs of the installed packages)", catalogs("de", 600), 600),
        ("SAIF prompts (the project's discovery contents and instructions)", "this project", saif_prompts(rng, 7000), 7000),
    ]
    train, heldout, manifest = [], [], []
    for name, package, texts, cap in sources:
        texts = sorted(set(texts))
        rng.shuffle(texts)
        texts = texts[:cap]
        held = [t for t in texts if int(hashlib.sha256(t.encode()).hexdigest(), 16) % 10 == 9]
        kept = [t for t in texts if int(hashlib.sha256(t.encode()).hexdigest(), 16) % 10 != 9]
        train.extend(kept)
        heldout.extend(held)
        pkg = package.split()[0]
        manifest.append({
            "source": name,
            "package": package,
            "version": package_version(pkg) if not pkg.startswith("(") else "",
            "licence": f"/usr/share/doc/{pkg}/copyright" if not pkg.startswith("(") else "each package's /usr/share/doc/<package>/copyright",
            "train_lines": len(kept),
            "heldout_lines": len(held),
        })
    rng.shuffle(train)
    rng.shuffle(heldout)
    files = {}
    for name, lines in (("train.txt", train), ("heldout.txt", heldout)):
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        files[name] = {"lines": len(lines), "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"sources": manifest, "files": files}, f, indent=1, ensure_ascii=False)
    for m in manifest:
        print(f"{m['train_lines']:>6} train {m['heldout_lines']:>5} held out  {m['source']}", file=sys.stderr)
    print(f"wrote {out_dir}/train.txt ({len(train)} lines) and heldout.txt ({len(heldout)} lines)", file=sys.stderr)


if __name__ == "__main__":
    main()
