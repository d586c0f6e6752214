# SAIF in the browser. The two commands of the README:
#   make serve   builds the app and serves it on http://127.0.0.1:8080 with the offline models
#   make test    runs every test (native, the engine in headless Chromium, the page end to end)
# Both run `setup` first, which installs only what is missing (see scripts/setup.sh).

.PHONY: setup serve build test bench fuzz corpus saes results fixtures

setup:
	@scripts/setup.sh

serve: setup
	@scripts/app.sh serve

build: setup
	@scripts/app.sh build

test: setup
	@scripts/test.sh

bench: setup
	@scripts/bench.sh

# Coverage-guided fuzzing of the GGUF, SAE, lens.json and link readers, five minutes a target (scripts/fuzz.sh).
fuzz: setup
	@scripts/fuzz.sh 300

# On request only: the SAE training corpus (Debian packages + SAIF prompts) into ~/.cache/saif/corpus ...
corpus: setup
	@scripts/sae.sh corpus

# ... and the shipped SAEs in public/saes, trained on it (about an hour on 2 cores).
saes: setup
	@scripts/sae.sh

# On request only: the experiments behind docs/results.md (several hours on 2 cores; see scripts/results.sh).
results: setup
	@scripts/results.sh

# Dev-only: rewrites the engine's random test models and their transformers references (needs torch; see the script).
fixtures:
	@python3 scripts/dev/make_fixtures.py
