// End-to-end tests of the page in headless Chromium: `make test` builds dist/ (trunk, with the offline models in
// dist/models) and runs `node --test` here. The page is served by serve.mjs, and Chromium is the system's
// (/usr/bin/chromium), driven by playwright-core. Every step leaves a screenshot in target/e2e-screenshots/.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import os from "node:os";
import { execFileSync } from "node:child_process";
import http from "node:http";
import { serve, launch, root } from "./serve.mjs";

const golden = (name) => JSON.parse(fs.readFileSync(path.resolve(root, "../shared/golden", name), "utf8"));
const smolGolden = golden("smollm2-135m-instruct-q4_1.json");
const gemmaGolden = golden("gemma-3-270m-q4_k_m.json");
const shippedLayers = JSON.parse(fs.readFileSync(path.join(root, "public/saes/index.json"), "utf8"));
const smolLayers = shippedLayers["smollm2-135m"].layers;
const gemmaLayers = shippedLayers["gemma-3-270m"].layers;
// The page starts on the SAE whose layer reproduces the recorded SAIF results, else on the last layer's.
const recorded = JSON.parse(fs.readFileSync(path.join(root, "crates/saif/data/steering.json"), "utf8")).models;
const smolStart = recorded["smollm2-135m"]?.["*"]?.layer ?? smolLayers[smolLayers.length - 1];
const models = process.env.SAIF_MODELS ?? path.join(process.env.HOME, ".cache/saif/models");
const shots = path.join(root, "target/e2e-screenshots");
fs.mkdirSync(shots, { recursive: true });

let server, base, browser;

before(async () => {
  ({ server, base } = await serve());
  browser = await launch();
});

after(async () => {
  await browser?.close();
  server?.close();
});

/** A page (of `at`, the tests' server unless given) that fails the test on any uncaught error or Rust panic in the
 * page or its worker. */
async function openPage(context, query, at = base) {
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" && /panicked|RuntimeError|unreachable/.test(m.text())) problems.push(m.text());
  });
  page.on("worker", (w) => w.on("console", (m) => {
    if (m.type() === "error" && /panicked|RuntimeError|unreachable/.test(m.text())) problems.push(`worker: ${m.text()}`);
  }));
  await page.goto(at + (query ?? ""));
  return { page, problems };
}

/** Saves a screenshot of the whole page as a test artifact. */
async function shot(page, name) {
  await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
}

const ids = async (page) => JSON.parse(await page.locator("#token-ids").textContent());
const attached = { state: "attached" };
// The model is loaded, and the SAE the page puts in use after it is in use (or has failed, with a notice).
const loaded = (page, timeout = 120_000) => page.waitForFunction(
  () => document.querySelector("#model-card") && !document.querySelector("#sae-loading"), null, { timeout });

async function setNumber(page, selector, value) {
  await page.fill(selector, String(value));
  await page.dispatchEvent(selector, "change");
}

/** Generates with the page; returns the default output's ids and the steered one's (when steering). */
async function generate(page) {
  await page.click("#generate");
  await page.waitForFunction(() => document.querySelector("#output-default")?.dataset.ids, null, { timeout: 300_000 });
  const read = async (sel) => (await page.locator(sel).count()) ? JSON.parse(await page.locator(sel).getAttribute("data-ids") || "null") : null;
  return { default: await read("#output-default"), steered: await read("#output-steered") };
}

test("loads the offline default with progress, shows its metadata and tokenizes what is typed", async () => {
  const context = await browser.newContext();
  const { page, problems } = await openPage(context, "?chat=0&text=" + encodeURIComponent("Hello, world!"));
  await page.locator("#load-progress").waitFor({ timeout: 60_000 });
  await shot(page, "01-loading");
  await loaded(page);
  const card = await page.locator("#model-card").textContent();
  assert.match(card, /llama/);
  assert.match(card, /Layers\s*30/);
  assert.match(card, /49152/);
  assert.match(card, /downloaded/);
  await page.locator("#token-ids").waitFor(attached);
  assert.deepEqual(await ids(page), smolGolden.tokenizer[0].ids);

  // Typing re-tokenizes; the link follows the text.
  for (const c of smolGolden.tokenizer.slice(1, 4)) {
    await page.locator("#prompt").fill(c.text);
    await page.waitForFunction((want) => document.querySelector("#token-ids")?.textContent === want,
      JSON.stringify(c.ids).replaceAll(",", ", "), { timeout: 10_000 });
  }
  assert.match(decodeURIComponent(page.url()), /im_start/);
  await shot(page, "01-loaded");

  // A second visit reads the model from the browser's cache, checked against its size and sha256.
  await page.reload();
  await loaded(page);
  assert.match(await page.locator("#model-card").textContent(), /from the browser cache/);
  // The card says where the load's time went: the cache read, the header, the tokenizer, the weights, and the wait
  // for the checksum that ran beside them.
  assert.match(await page.locator("#model-card tr", { hasText: "Load steps" }).textContent(),
    /Reading from the browser cache [\d.]+ s · Reading the GGUF header [\d.]+ s · Building the tokenizer [\d.]+ s · Loading weights [\d.]+ s · Checking the cached copy [\d.]+ s/);
  // The cache panel lists it with its size and checksum, and can delete it.
  await page.click("#cache-panel summary");
  await page.locator("#cache-list tr", { hasText: "SmolLM2-135M-Instruct.Q4_1.gguf" }).waitFor({ timeout: 30_000 });
  const row = page.locator("#cache-list tr", { hasText: "SmolLM2-135M-Instruct.Q4_1.gguf" });
  assert.match(await row.textContent(), /98\.4 MB.*b179c9523d0e/);
  await shot(page, "01-cache");
  await row.locator("button").click();
  await page.waitForFunction(() => !document.querySelector("#cache-list")?.textContent.includes("SmolLM2"), null, { timeout: 30_000 });
  assert.deepEqual(problems, []);
  await context.close();
});

test("a file that is not GGUF gets a clear error and the page stays usable", async () => {
  const context = await browser.newContext();
  const { page, problems } = await openPage(context, "?chat=0&model=" + encodeURIComponent(base + "index.html"));
  // A URL outside the catalog is not loaded before the visitor agrees.
  await page.locator("#confirm-model").waitFor({ timeout: 60_000 });
  await page.click("#confirm-load");
  await page.locator(".error").waitFor({ timeout: 60_000 });
  assert.match(await page.locator(".error-message").textContent(), /not a GGUF file/);
  await shot(page, "02-not-gguf");
  // Pick the offline default and load it: everything works again.
  await page.selectOption("#model-select", "smollm2-135m-instruct");
  await page.click("#load-button");
  await loaded(page);
  assert.equal(await page.locator(".error").count(), 0);
  await page.locator("#prompt").fill("Hello, world!");
  await page.waitForFunction(() => document.querySelector("#token-ids")?.textContent === "[19556, 28, 905, 17]");
  assert.deepEqual(problems, []);
  await context.close();
});

test("a malformed or hostile link falls back to the defaults and says what it ignored", async () => {
  const context = await browser.newContext();
  const asked = [];
  await context.route("**/*", (route) => {
    const url = route.request().url();
    if (!url.startsWith(base)) asked.push(url);
    return url.startsWith(base) ? route.continue() : route.abort();
  });
  const hostile = "?model=javascript%3Aalert(1)&colour=red&text=%E2%82&steer=1%3ANaN,2%3A1e30&mult=1e9&sae=..%2F..%2Fetc&temp=-1";
  const { page, problems } = await openPage(context, hostile);
  await page.locator(".notice").waitFor({ timeout: 30_000 });
  const notice = await page.locator(".notice").textContent();
  for (const why of [/neither a known model/, /colour/, /steer=/, /mult=/, /sae=/, /temp=/]) assert.match(notice, why);
  await loaded(page);
  assert.match(await page.locator("#model-card").textContent(), /llama/);
  assert.match(await page.locator("#steering-list").textContent(), /No latent steers/);
  await shot(page, "03-hostile-link");
  await context.close();

  // A model on another host, or on a host that only looks local, waits for consent and downloads nothing.
  for (const model of ["https://example.org/model.gguf", "http://localhost.evil.com/m.gguf", "http://localhost@evil.com/m.gguf"]) {
    const context = await browser.newContext();
    await context.route("**/*", (route) => {
      const url = route.request().url();
      if (!url.startsWith(base)) asked.push(url);
      return url.startsWith(base) ? route.continue() : route.abort();
    });
    const { page } = await openPage(context, "?model=" + encodeURIComponent(model));
    if (model.startsWith("https")) {
      await page.locator("#confirm-model").waitFor({ timeout: 30_000 });
      assert.match(await page.locator("#confirm-model").textContent(), /example\.org\/model\.gguf/);
      await shot(page, "03-confirm-model");
      await page.click("#confirm-default");
    } else {
      await page.locator(".notice", { hasText: "neither a known model" }).waitFor({ timeout: 30_000 });
    }
    await loaded(page);
    await context.close();
  }
  assert.deepEqual(asked, [], "nothing was fetched from another host");
  assert.deepEqual(problems, []);
});

test("Gemma 3 270M loads and tokenizes with BOS as its GGUF asks, and a Gemma Scope 2 preset downloads from its Hugging Face paths", async () => {
  const context = await browser.newContext();
  // Hugging Face cannot be reached here: the same paths are served from this test, with an SAE in Gemma Scope 2's
  // layout made for Gemma 3 270M (640 wide) on layer 17.
  const served = [];
  const preset = "https://huggingface.co/google/gemma-scope-2-270m-it/resolve/main/resid_post_all/layer_17_width_16k_l0_medium/";
  await context.route(preset + "**", (route) => {
    const file = route.request().url().slice(preset.length);
    served.push(file);
    if (file === "config.json") {
      return route.fulfill({ status: 200, contentType: "application/json",
        body: JSON.stringify({ architecture: "jump_relu", layer: 17, model_name: "google/gemma-3-270m-it" }) });
    }
    if (file === "params.safetensors") return route.fulfill({ status: 200, body: jumpReluSae(640, 256, 17) });
    return route.fulfill({ status: 404, body: "not found" });
  });
  const prompt = gemmaGolden.prompts[1];
  const { page, problems } = await openPage(context, "?model=gemma-3-270m&backend=cpu&chat=0&text=" + encodeURIComponent(prompt.prompt));
  await loaded(page, 240_000);
  assert.match(await page.locator("#model-card").textContent(), /gemma3/);
  await page.locator("#token-ids").waitFor(attached);
  assert.deepEqual(await ids(page), prompt.input_ids);
  await page.selectOption("#sae-select", "preset:gemmascope2-res-17-16k");
  await page.locator("#latents-panel .hint", { hasText: "Gemma Scope 2, residual stream, layer 17" }).waitFor({ timeout: 120_000 });
  assert.deepEqual(served.sort(), ["config.json", "params.safetensors"], "only the folder's two files are fetched");
  assert.match(page.url(), /sae=gemmascope2-res-17-16k/);
  await page.click("#read-latents");
  await page.locator("#latent-table").waitFor({ timeout: 120_000 });
  await shot(page, "04-gemma-scope-preset");
  assert.deepEqual(problems, []);
  await context.close();
});

test("a real GGUF generates on WebGPU in the browser, the tokens of the reference", async () => {
  const context = await browser.newContext();
  const p = smolGolden.prompts[0];
  const { page, problems } = await openPage(context, "?chat=0&backend=webgpu&text=" + encodeURIComponent(p.prompt));
  await loaded(page);
  assert.match(await page.locator("#model-card").textContent(), /Runs on\s*wgpu/);
  await setNumber(page, "#max-new-tokens", 16);
  assert.deepEqual((await generate(page)).default, p.greedy16_ids);
  assert.match(await page.locator("#generation-stats").textContent(), /16 tokens/);
  await shot(page, "05-webgpu-generated");
  assert.deepEqual(problems, []);
  await context.close();
});

/** What the model card should say of the CPU path on a cross-origin isolated page: a thread per core, at most 8. */
async function threadsExpected(page) {
  const n = Math.min(8, await page.evaluate(() => navigator.hardwareConcurrency));
  return n === 1 ? "WebAssembly, one thread" : `WebAssembly, ${n} threads`;
}

test("the CPU backend in the browser gives the same tokens on its threads, and sampling with a seed repeats", async () => {
  const context = await browser.newContext();
  const p = smolGolden.prompts[0];
  const { page, problems } = await openPage(context, "?chat=0&backend=cpu&text=" + encodeURIComponent(p.prompt));
  await loaded(page);
  assert.equal(await page.evaluate(() => crossOriginIsolated), true, "the test server sends COOP and COEP");
  assert.match(await page.locator("#model-card").textContent(), new RegExp(`Runs on\\s*cpu \\(${await threadsExpected(page)}\\)`));
  await setNumber(page, "#max-new-tokens", 16);
  assert.deepEqual((await generate(page)).default, p.greedy16_ids);
  await page.uncheck("#greedy");
  const first = (await generate(page)).default;
  const second = (await generate(page)).default;
  assert.deepEqual(first, second);
  assert.notDeepEqual(first, p.greedy16_ids);
  assert.match(page.url(), /greedy=0/);
  assert.deepEqual(problems, []);
  await context.close();
});

test("the CPU path with 8-bit activations: named in the model card, the prompt's token exact, the generation repeatable", async () => {
  const context = await browser.newContext();
  const p = smolGolden.prompts[0];
  const { page, problems } = await openPage(context, "?chat=0&backend=cpu-int8&text=" + encodeURIComponent(p.prompt));
  await loaded(page);
  assert.match(await page.locator("#model-card").textContent(), /Runs on\s*cpu \(.*\), activations rounded to 8 bits/);
  assert.equal(await page.inputValue("#backend-select"), "cpu-int8");
  await setNumber(page, "#max-new-tokens", 16);
  const first = (await generate(page)).default;
  // The prompt is read with the exact products, so the first token is the reference's; the steps after it round.
  assert.equal(first[0], p.greedy16_ids[0]);
  const agree = first.findIndex((id, i) => id !== p.greedy16_ids[i]);
  console.log(`8-bit activations: the first ${agree < 0 ? 16 : agree} of 16 greedy tokens are the exact path's`);
  assert.deepEqual((await generate(page)).default, first);
  assert.deepEqual(problems, []);
  await context.close();
});

test("Stop ends a generation between two tokens, and the page stays usable", async () => {
  const context = await browser.newContext();
  const p = smolGolden.prompts[0];
  const { page, problems } = await openPage(context, "?chat=0&backend=cpu&text=" + encodeURIComponent(p.prompt));
  await loaded(page);
  await setNumber(page, "#max-new-tokens", 1000);
  await page.click("#generate");
  // A few tokens streamed, then Stop: the worker reads it between two tokens.
  await page.waitForFunction(() => (document.querySelector("#output-default")?.textContent ?? "").length > 8, null, { timeout: 120_000 });
  await page.click("#stop");
  await page.waitForFunction(() => document.querySelector("#output-default")?.dataset.ids, null, { timeout: 60_000 });
  const stopped = JSON.parse(await page.locator("#output-default").getAttribute("data-ids"));
  assert.ok(stopped.length > 0 && stopped.length < 1000, `${stopped.length} tokens`);
  assert.match(await page.locator("#generation-stats").textContent(), /cancelled/);
  // The prefix generated before Stop is the reference's greedy continuation.
  assert.deepEqual(stopped.slice(0, 16), p.greedy16_ids.slice(0, Math.min(16, stopped.length)));
  await setNumber(page, "#max-new-tokens", 16);
  assert.deepEqual((await generate(page)).default, p.greedy16_ids);
  assert.deepEqual(problems, []);
  await context.close();
});

/** Opens SmolLM2 on the CPU from `host` (a `serve()`), checks the page's isolation and the model card's "Runs on",
 * and that 16 greedy tokens are the reference's; returns the page's text, and closes the host. */
async function oneThreadGeneration(host, { isolated, runsOn, name }) {
  const context = await browser.newContext();
  const p = smolGolden.prompts[0];
  const { page, problems } = await openPage(context, "?chat=0&backend=cpu&text=" + encodeURIComponent(p.prompt), host.base);
  await loaded(page);
  assert.equal(await page.evaluate(() => crossOriginIsolated), isolated);
  assert.match(await page.locator("#model-card").textContent(), runsOn);
  await setNumber(page, "#max-new-tokens", 16);
  assert.deepEqual((await generate(page)).default, p.greedy16_ids);
  await shot(page, name);
  const text = await page.locator("body").textContent();
  assert.deepEqual(problems, []);
  await context.close();
  host.server.close();
  return text;
}

test("a page that is not cross-origin isolated runs the CPU path on one thread, with the same tokens", async () => {
  await oneThreadGeneration(await serve({ isolated: false }), {
    isolated: false,
    runsOn: /Runs on\s*cpu \(WebAssembly, one thread \(the page is not cross-origin isolated\)\)/,
    name: "06-cpu-one-thread",
  });
});

test("a threaded engine that cannot start gives way to the one-thread engine, with a notice", async () => {
  const text = await oneThreadGeneration(await serve({ missing: ["saif-worker-threads_bg.wasm"] }), {
    isolated: true,
    runsOn: /Runs on\s*cpu \(WebAssembly, one thread\)/,
    name: "06-cpu-threads-fallback",
  });
  assert.match(text, /threaded build could not start/);
});

/** What `saif steer` generates natively for the same steering (the page's default and steered tokens must match). */
function saifSteer(latents, layer, prompt, tokens) {
  const out = execFileSync(path.join(root, "target/release/saif"), ["steer", "--model", path.join(models, "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "--latent", latents, "--layer", String(layer), "--prompt", prompt, "--max-new-tokens", String(tokens), "--greedy", "--json"]);
  return JSON.parse(out.toString());
}

test("a shared link reopens a steering experiment: default and steered side by side, as saif steer gives them, on the CPU and on WebGPU", async () => {
  const p = smolGolden.prompts[0];
  const last = smolLayers[smolLayers.length - 1];
  const cli = saifSteer("5:1,6:-1", last, p.prompt, 8);
  assert.deepEqual(cli.default.ids, p.greedy16_ids.slice(0, 8), "saif steer's default output is the reference's");
  assert.notDeepEqual(cli.steered.ids, cli.default.ids, "the steering changes the output");
  for (const backend of ["cpu", "webgpu"]) {
    const context = await browser.newContext();
    const link = `?model=smollm2-135m-instruct&sae=${last}&steer=5:1,6:-1&mult=1&scope=all&text=${encodeURIComponent(p.prompt)}&chat=0&seed=0&greedy=1&backend=${backend}`;
    const { page, problems } = await openPage(context, link);
    await loaded(page);
    // The link's state is back: the steering set, the prompt, the sampling.
    await page.locator("#steering-list li.steered").nth(1).waitFor({ timeout: 30_000 });
    assert.deepEqual(await page.locator("#steering-list li.steered").evaluateAll((li) => li.map((l) => l.dataset.latent)), ["5", "6"]);
    assert.equal(await page.locator("#prompt").inputValue(), p.prompt);
    assert.equal(await page.locator("#greedy").isChecked(), true);
    await setNumber(page, "#max-new-tokens", 8);
    const out = await generate(page);
    assert.deepEqual(out.default, p.greedy16_ids.slice(0, 8), `${backend}: the default output is the reference's`);
    assert.deepEqual(out.steered, cli.steered.ids, `${backend}: the steered output is saif steer's`);
    await shot(page, `06-steered-${backend}`);
    console.log(`${backend}: longest frame of the page during generation: ${(await page.evaluate(() => window.saifLongestFrameMs ?? 0)).toFixed(1)} ms`);
    // The link the page writes reopens the same experiment.
    const again = await context.newPage();
    await again.goto(page.url());
    await loaded(again);
    assert.deepEqual(await again.locator("#steering-list li.steered").evaluateAll((li) => li.map((l) => l.dataset.latent)), ["5", "6"]);
    assert.equal(await again.locator("#prompt").inputValue(), p.prompt);
    assert.deepEqual(problems, []);
    await context.close();
  }
});

test("latents: every token coloured, search by token text, a latent's card, and steering from the lists", async () => {
  const context = await browser.newContext();
  // The last layer's SAE, whose latents promote the word "French" itself (layer 25's promote French endings).
  const last = smolLayers[smolLayers.length - 1];
  const { page, problems } = await openPage(context, `?backend=cpu&chat=1&sae=${last}&text=` +
    encodeURIComponent("The weather is nice today. Translate the text into French."));
  await loaded(page);
  await page.locator("#model-card", { hasText: `SAElayer ${last},` }).waitFor({ timeout: 120_000 });
  assert.match(await page.locator("#model-card").textContent(), new RegExp(`SAElayer ${last}, \\d+ latents, TopK \\(k = \\d+\\)`));
  assert.deepEqual(await page.locator("#sae-select option:not([disabled])").allTextContents(), smolLayers.map((l) => `shipped, layer ${l}`));
  await page.click("#read-latents");
  await page.locator("#latent-table").waitFor({ timeout: 120_000 });
  assert.equal(await page.locator("#latent-table tr").count(), 1 + 12, "a header and the 12 most active latents");
  assert.equal(await page.locator("#token-view .token").count(), await page.locator("#token-view .token").count());
  assert.ok((await page.locator("#token-view .token").count()) > 10, "every prompt token is shown");
  assert.ok((await page.locator("#latent-table .lens").first().textContent()).length > 0, "each latent shows the tokens it promotes");
  // Search by token text: the best latents promote "French".
  await page.fill("#latent-search", "French");
  const searched = Date.now();
  await page.press("#latent-search", "Enter");
  await page.locator("#latent-results table").waitFor({ timeout: 60_000 });
  console.log(`search for "French" over every latent answered in ${Date.now() - searched} ms (round trip to the worker)`);
  const lens = await page.locator("#latent-results .lens").allTextContents();
  assert.ok(lens.slice(0, 3).some((t) => /french/i.test(t)), `a top result promotes French: ${lens.slice(0, 3)}`);
  // A latent's card: its tokens, its activation on each prompt token and their histogram.
  await page.locator("#latent-table .latent-index").first().click();
  await page.locator("#latent-card .histogram").waitFor({ timeout: 30_000 });
  assert.equal(await page.locator("#latent-card table.per-token tr").count(), await page.locator("#token-view .token").count());
  // Steering from the search results puts the latent in the steering set and the link.
  const first = page.locator("#latent-results .latent-row").first();
  const latent = await first.getAttribute("data-latent");
  await first.locator(".steer-on").check();
  await page.locator(`#steering-list li.steered[data-latent="${latent}"]`).waitFor();
  assert.match(decodeURIComponent(page.url()), new RegExp(`steer=${latent}:`));
  await shot(page, "07-latents");
  // Another layer's SAE, and another model's: nothing left of the last reading.
  await page.selectOption("#sae-select", `layer:${smolLayers[0]}`);
  await page.locator("#latents-panel .hint", { hasText: `layer ${smolLayers[0]} (shipped with the page` }).waitFor({ timeout: 120_000 });
  assert.equal(await page.locator("#latent-table").count(), 0);
  await page.selectOption("#model-select", "gemma-3-270m");
  await page.click("#load-button");
  // The new model's own default SAE, not the layer picked for the old one, and none of the old latents steer.
  await page.locator("#latents-panel", { hasText: `saes/gemma-3-270m/layer_${gemmaLayers[gemmaLayers.length - 1]}` }).waitFor({ timeout: 240_000 });
  await page.locator(".notice", { hasText: "The steering set was emptied" }).waitFor({ timeout: 30_000 });
  assert.equal(await page.locator("#steering-list li.steered").count(), 0);
  assert.equal(await page.locator("#sae-select").inputValue(), `layer:${gemmaLayers[gemmaLayers.length - 1]}`);
  assert.deepEqual(await page.locator("#sae-select option:not([disabled])").allTextContents(),
    [...gemmaLayers.map((l) => `shipped, layer ${l}`), ...["Gemma Scope 2, residual stream, layer 9, 16k latents (about 84 MB)",
      "Gemma Scope 2, residual stream, layer 17 (the last), 16k latents (about 84 MB)"]]);
  assert.deepEqual(problems, []);
  await context.close();
});

test("SAIF in the page: a small discovery, its latents applied as steering, and an evaluation against the baselines", async () => {
  const context = await browser.newContext();
  const { page, problems } = await openPage(context, "?backend=cpu&chat=1");
  await loaded(page);
  await setNumber(page, "#saif-k", 5);
  await setNumber(page, "#saif-contents", 6);
  await page.click("#saif-discover");
  await page.locator("#work-progress").waitFor({ timeout: 30_000 });
  await shot(page, "08-discovering");
  await page.locator("#saif-results table").waitFor({ timeout: 300_000 });
  const rows = await page.locator("#saif-results .latent-row").count();
  assert.ok(rows >= 1 && rows <= 5, `${rows} latents`);
  await page.click("#saif-apply");
  assert.equal(await page.locator("#steering-list li.steered").count(), rows);
  await setNumber(page, "#saif-eval-contents", 2);
  await setNumber(page, "#saif-eval-tokens", 4);
  for (const m of ["diffmean", "random"]) await page.uncheck(`.saif-method[value="${m}"]`);
  // The page starts on the recorded layer's SAE, so the strengths start at the ones recorded for translate-fr.
  const fr = recorded["smollm2-135m"]["translate-fr"];
  assert.equal(await page.inputValue("#saif-alphas"), String(fr.alpha));
  assert.match(await page.locator("#saif-recorded").textContent(), new RegExp(`layer ${fr.layer}, k = ${fr.k}, SAIF α = ${fr.alpha},`));
  await page.fill("#saif-alphas", "1");
  await page.dispatchEvent("#saif-alphas", "change");
  await page.click("#saif-eval");
  await page.locator("#eval-table").waitFor({ timeout: 300_000 });
  const methods = await page.locator("#eval-table tr[data-method]").evaluateAll((r) => r.map((x) => x.dataset.method));
  assert.deepEqual(methods, ["none", "prompt", "saif"]);
  assert.match(await page.locator("#eval-table").textContent(), /\d+% \[\d+, \d+\]/);
  await page.locator("figure.chart svg").first().waitFor();
  await shot(page, "08-evaluated");
  const longest = await page.evaluate(() => window.saifLongestFrameMs ?? 0);
  console.log(`longest frame of the page during discovery and evaluation: ${longest.toFixed(1)} ms`);
  assert.ok(longest < 500, "the page kept drawing while the worker worked");
  assert.deepEqual(problems, []);
  await context.close();
});

test("the benchmark page measures the loaded model", async () => {
  const context = await browser.newContext();
  const { page, problems } = await openPage(context, "?chat=0&backend=webgpu");
  await loaded(page);
  await page.click("#bench-panel summary");
  for (const [field, value] of [["Prompt tokens", "8"], ["Decoded tokens", "4"], ["Runs", "1"]]) {
    const input = page.locator("#bench-panel label", { hasText: field }).locator("input");
    await input.fill(value);
    await input.dispatchEvent("change");
  }
  await page.click("#run-bench");
  await page.locator("#bench-results").waitFor({ timeout: 300_000 });
  const results = await page.locator("#bench-results").textContent();
  assert.match(results, /Prefill[\d.]+ tokens\/s \(8 tokens\)/);
  assert.match(results, /Dispatches per token\d+/);
  assert.match(results, /GPU memory held/);
  assert.deepEqual(problems, []);
  await context.close();
});

test("errors leave the page usable: a damaged shipped SAE, a wrong SAE, a corrupt cache entry, an interrupted download, a lost GPU", async () => {
  const context = await browser.newContext();
  const last = smolStart;
  // The worker's download of the SAE it starts on gets 100 bytes of noise instead of the file.
  await context.route(`**/saes/smollm2-135m/layer_${last}/params.safetensors`, (route) =>
    route.fulfill({ status: 200, contentType: "application/octet-stream", body: Buffer.alloc(100, 7) }));
  const p = smolGolden.prompts[0];
  const { page, problems } = await openPage(context, "?chat=0&backend=cpu&text=" + encodeURIComponent(p.prompt));
  await loaded(page);
  await page.locator(".notice").waitFor({ timeout: 30_000 });
  assert.match(await page.locator(".notice").textContent(),
    new RegExp(`The SAE shipped for this model could not be loaded \\(.*saes/smollm2-135m/layer_${last}.+\\); no latents\\.`));
  await setNumber(page, "#max-new-tokens", 8);
  assert.deepEqual((await generate(page)).default, p.greedy16_ids.slice(0, 8));
  await shot(page, "09-damaged-sae");
  await context.unroute(`**/saes/smollm2-135m/layer_${last}/params.safetensors`);

  // An SAE for another model (Gemma's, 640 wide) is refused with the reason.
  await page.selectOption("#sae-select", `layer:${smolLayers[0]}`);
  await page.locator("#latents-panel .hint", { hasText: `layer ${smolLayers[0]} (shipped` }).waitFor({ timeout: 120_000 });
  const gemmaSae = path.join(root, `public/saes/gemma-3-270m/layer_${gemmaLayers[0]}`);
  await page.click("#latents-panel .sae-files summary");
  await page.setInputFiles("#sae-files", [path.join(gemmaSae, "params.safetensors"), path.join(gemmaSae, "config.json")]);
  await page.locator(".error").waitFor({ timeout: 60_000 });
  assert.match(await page.locator(".error-message").textContent(), /does not fit the model: it reads vectors of 640 values but smollm2-135m's residual stream has 576/);
  await shot(page, "09-wrong-sae");
  await page.click(".error .dismiss");

  // An SAE of the right width that records another model (SmolLM2's own, its record changed to say a pretrained
  // model): the page asks first. "No" leaves the SAE in use as it was; "yes" uses the new one.
  const other = fs.mkdtempSync(path.join(os.tmpdir(), "saif-other-model-"));
  const smolSae = path.join(root, `public/saes/smollm2-135m/layer_${smolLayers[0]}`);
  const config = JSON.parse(fs.readFileSync(path.join(smolSae, "config.json"), "utf8"));
  config.model_fingerprint.instruction_tuned = false;
  fs.writeFileSync(path.join(other, "config.json"), JSON.stringify(config));
  fs.copyFileSync(path.join(smolSae, "params.safetensors"), path.join(other, "params.safetensors"));
  const otherFiles = [path.join(other, "params.safetensors"), path.join(other, "config.json")];
  let asked = "";
  page.once("dialog", (dialog) => { asked = dialog.message(); dialog.dismiss(); });
  await page.setInputFiles("#sae-files", otherFiles);
  await page.locator(".error").waitFor({ timeout: 60_000 });
  assert.match(asked, /trained on another model \(pretrained against instruction-tuned\).*Use it anyway\?/s);
  assert.match(await page.locator(".error-message").textContent(), /That SAE was not used/);
  await page.locator("#latents-panel .hint", { hasText: `layer ${smolLayers[0]} (shipped` }).waitFor();
  await page.click(".error .dismiss");
  page.once("dialog", (dialog) => dialog.accept());
  await page.setInputFiles("#sae-files", otherFiles);
  await page.locator("#latents-panel .hint", { hasText: "from your disk: params.safetensors, config.json" }).waitFor({ timeout: 120_000 });
  await shot(page, "09-other-model-sae");

  // A cached model whose bytes no longer match its checksum is deleted and downloaded again.
  await page.evaluate(async () => {
    const cache = await caches.open("saif-models-v1");
    const url = new URL("models/SmolLM2-135M-Instruct.Q4_1.gguf", location.href).href;
    const bytes = new Uint8Array(await (await cache.match(url)).arrayBuffer());
    bytes[1000] ^= 0xff;
    await cache.put(url, new Response(bytes, { headers: { "x-saif-bytes": String(bytes.length),
      "x-saif-sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" } }));
  });
  await page.reload();
  await page.locator(".notice", { hasText: "was damaged" }).waitFor({ timeout: 120_000 });
  await loaded(page);
  assert.match(await page.locator("#model-card").textContent(), /downloaded/);
  await shot(page, "09-corrupt-cache");

  // A download cut short (the server closes the connection after 5 MB of 98) is an error, and leaves nothing in the
  // cache; the page stays usable.
  const model = fs.readFileSync(path.join(models, "SmolLM2-135M-Instruct.Q4_1.gguf"));
  const cut = http.createServer((req, res) => {
    res.writeHead(200, { "content-type": "application/octet-stream", "content-length": model.length, "access-control-allow-origin": "*" });
    res.write(model.subarray(0, 5_000_000), () => res.destroy());
  });
  await new Promise((ok) => cut.listen(0, "127.0.0.1", ok));
  const cutUrl = `http://127.0.0.1:${cut.address().port}/cut.gguf`;
  const cutPage = await context.newPage();
  await cutPage.goto(base + "?backend=cpu&model=" + encodeURIComponent(cutUrl));
  await cutPage.click("#confirm-load");
  await cutPage.locator(".error").waitFor({ timeout: 120_000 });
  assert.match(await cutPage.locator(".error-message").textContent(), /cut\.gguf|reading failed|stopped/);
  assert.equal(await cutPage.evaluate(async (url) => !!(await (await caches.open("saif-models-v1")).match(url)), cutUrl), false,
    "an interrupted download leaves nothing in the cache");
  await shot(cutPage, "09-interrupted");
  await cutPage.click(".error .dismiss");
  await cutPage.selectOption("#model-select", "smollm2-135m-instruct");
  await cutPage.click("#load-button");
  await loaded(cutPage);
  await cutPage.close();
  cut.close();

  // A lost GPU: the page says so and offers the CPU, which works.
  await page.selectOption("#backend-select", "webgpu");
  await page.click("#load-button");
  await page.locator("#model-card", { hasText: "wgpu" }).waitFor({ timeout: 120_000 });
  await page.evaluate(() => window.saifDebug.loseGpu());
  await page.waitForTimeout(500);
  await page.click("#generate");
  await page.locator("#reload-on-cpu").waitFor({ timeout: 60_000 });
  await shot(page, "09-gpu-lost");
  await page.click("#reload-on-cpu");
  await page.locator("#model-card", { hasText: /Runs on\s*cpu/ }).waitFor({ timeout: 120_000 });
  await setNumber(page, "#max-new-tokens", 8);
  assert.deepEqual((await generate(page)).default, p.greedy16_ids.slice(0, 8));
  assert.deepEqual(problems, []);
  await context.close();
});

/** A JumpReLU SAE in Gemma Scope 2's safetensors layout (f32; `w_enc [d_in, d_sae]` ...), random but fixed. */
function jumpReluSae(dIn, dSae, seed) {
  let s = seed;
  const next = () => ((s = (s * 1103515245 + 12345) % 2147483648) / 2147483648 - 0.5);
  const tensors = {
    w_enc: [[dIn, dSae], () => next() * 0.1],
    w_dec: [[dSae, dIn], () => next() * 0.1],
    b_enc: [[dSae], () => 0],
    b_dec: [[dIn], () => 0],
    threshold: [[dSae], () => 0.01],
  };
  const header = {};
  const parts = [];
  let offset = 0;
  for (const [name, [shape, value]] of Object.entries(tensors)) {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n).map(value);
    header[name] = { dtype: "F32", shape, data_offsets: [offset, offset + n * 4] };
    parts.push(Buffer.from(data.buffer));
    offset += n * 4;
  }
  let json = JSON.stringify(header);
  while (json.length % 8) json += " ";
  const size = Buffer.alloc(8);
  size.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([size, Buffer.from(json), ...parts]);
}
