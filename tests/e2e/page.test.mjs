// End-to-end tests of the page in headless Chromium: `make test` builds dist/ (trunk, with the offline models in
// dist/models) and runs `node --test` here. The page is served by a small static server started below, and
// Chromium is the system's (/usr/bin/chromium), driven by playwright-core.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "../..");
const dist = path.join(root, "dist");
const golden = (name) => JSON.parse(fs.readFileSync(path.resolve(root, "../shared/golden", name), "utf8"));
const smolGolden = golden("smollm2-135m-instruct-q4_1.json");
const gemmaGolden = golden("gemma-3-270m-q4_k_m.json");

const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".css": "text/css" };
let server, base, browser;

before(async () => {
  assert.ok(fs.existsSync(path.join(dist, "index.html")), "dist/ is missing: run `make build` first");
  server = http.createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    const file = path.join(dist, decodeURIComponent(url.pathname === "/" ? "/index.html" : url.pathname));
    if (!file.startsWith(dist) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
      res.writeHead(404, { "content-type": "text/plain" });
      return res.end("not found");
    }
    res.writeHead(200, {
      "content-type": types[path.extname(file)] ?? "application/octet-stream",
      "content-length": fs.statSync(file).size,
    });
    fs.createReadStream(file).pipe(res);
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  base = `http://127.0.0.1:${server.address().port}/`;
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--enable-unsafe-webgpu", "--disable-background-networking", "--disable-component-update",
      "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"],
  });
});

after(async () => {
  await browser?.close();
  server?.close();
});

/** A page that fails the test on any uncaught error or Rust panic in the page or its worker. */
async function openPage(context, query) {
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error" && /panicked|RuntimeError|unreachable/.test(m.text())) problems.push(m.text());
  });
  page.on("worker", (w) => w.on("console", (m) => {
    if (m.type() === "error" && /panicked|RuntimeError|unreachable/.test(m.text())) problems.push(`worker: ${m.text()}`);
  }));
  await page.goto(base + (query ?? ""));
  return { page, problems };
}

const ids = async (page) => JSON.parse(await page.locator("#token-ids").textContent());
const attached = { state: "attached" };

test("loads the offline default with progress, shows its metadata and tokenizes what is typed", async () => {
  const context = await browser.newContext();
  const { page, problems } = await openPage(context, "?chat=0&text=" + encodeURIComponent("Hello, world!"));
  await page.locator("#load-progress").waitFor({ timeout: 60_000 });
  await page.locator("#model-card").waitFor({ timeout: 120_000 });
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

  // A second visit reads the model from the browser's cache.
  await page.reload();
  await page.locator("#model-card").waitFor({ timeout: 120_000 });
  assert.match(await page.locator("#model-card").textContent(), /from the browser cache/);
  assert.deepEqual(problems, []);
  await context.close();
});

test("a file that is not GGUF gets a clear error and the page stays usable", async () => {
  const context = await browser.newContext();
  const { page, problems } = await openPage(context, "?chat=0&model=" + encodeURIComponent(base + "index.html"));
  await page.locator(".error").waitFor({ timeout: 60_000 });
  assert.match(await page.locator(".error-message").textContent(), /not a GGUF file/);
  // Pick the offline default and load it: everything works again.
  await page.selectOption("#model-select", "smollm2-135m-instruct");
  await page.click("#load-button");
  await page.locator("#model-card").waitFor({ timeout: 120_000 });
  assert.equal(await page.locator(".error").count(), 0);
  await page.locator("#prompt").fill("Hello, world!");
  await page.waitForFunction(() => document.querySelector("#token-ids")?.textContent === "[19556, 28, 905, 17]");
  assert.deepEqual(problems, []);
  await context.close();
});

test("a malformed link falls back to the default and says what it ignored", async () => {
  const context = await browser.newContext();
  const { page, problems } = await openPage(context, "?model=javascript%3Aalert(1)&colour=red&text=%E2%82");
  await page.locator(".notice").waitFor({ timeout: 30_000 });
  const notice = await page.locator(".notice").textContent();
  assert.match(notice, /neither a known model/);
  assert.match(notice, /colour/);
  await page.locator("#model-card").waitFor({ timeout: 120_000 });
  assert.match(await page.locator("#model-card").textContent(), /llama/);
  assert.deepEqual(problems, []);
  await context.close();
});

test("Gemma 3 270M loads and tokenizes with BOS as its GGUF asks", async () => {
  const context = await browser.newContext();
  const prompt = gemmaGolden.prompts[1];
  const { page, problems } = await openPage(context, "?model=gemma-3-270m&chat=0&text=" + encodeURIComponent(prompt.prompt));
  await page.locator("#model-card").waitFor({ timeout: 240_000 });
  assert.match(await page.locator("#model-card").textContent(), /gemma3/);
  await page.locator("#token-ids").waitFor(attached);
  assert.deepEqual(await ids(page), prompt.input_ids);
  assert.deepEqual(problems, []);
  await context.close();
});

/** Generates with the page and returns the ids it reports. */
async function generate(page) {
  await page.click("#generate");
  await page.waitForFunction(() => document.querySelector("#output")?.dataset.ids, null, { timeout: 300_000 });
  return JSON.parse(await page.locator("#output").getAttribute("data-ids"));
}

test("a real GGUF generates on WebGPU in the browser, the tokens of the reference", async () => {
  const context = await browser.newContext();
  const p = smolGolden.prompts[0];
  const { page, problems } = await openPage(context, "?chat=0&backend=webgpu&text=" + encodeURIComponent(p.prompt));
  await page.locator("#model-card").waitFor({ timeout: 120_000 });
  assert.match(await page.locator("#model-card").textContent(), /Runs on\s*wgpu/);
  await page.fill("#max-new-tokens", "16");
  await page.dispatchEvent("#max-new-tokens", "change");
  assert.deepEqual(await generate(page), p.greedy16_ids);
  assert.match(await page.locator("#generation-stats").textContent(), /16 tokens/);
  assert.deepEqual(problems, []);
  await context.close();
});

test("the CPU backend in the browser gives the same tokens, and sampling with a seed repeats", async () => {
  const context = await browser.newContext();
  const p = smolGolden.prompts[0];
  const { page, problems } = await openPage(context, "?chat=0&backend=cpu&text=" + encodeURIComponent(p.prompt));
  await page.locator("#model-card").waitFor({ timeout: 120_000 });
  assert.match(await page.locator("#model-card").textContent(), /Runs on\s*cpu/);
  await page.fill("#max-new-tokens", "16");
  await page.dispatchEvent("#max-new-tokens", "change");
  assert.deepEqual(await generate(page), p.greedy16_ids);
  await page.uncheck("#greedy");
  const first = await generate(page);
  const second = await generate(page);
  assert.deepEqual(first, second);
  assert.notDeepEqual(first, p.greedy16_ids);
  assert.deepEqual(problems, []);
  await context.close();
});

test("the benchmark page measures the loaded model", async () => {
  const context = await browser.newContext();
  const { page, problems } = await openPage(context, "?chat=0&backend=webgpu");
  await page.locator("#model-card").waitFor({ timeout: 120_000 });
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

test("the shipped SAEs are found for the model and show the latents at the prompt's last token, on the layer chosen", async () => {
  const context = await browser.newContext();
  const { page, problems } = await openPage(context, "?backend=cpu&chat=1&text=" +
    encodeURIComponent("The weather is nice today. Translate the text into French."));
  await page.locator("#model-card").waitFor({ timeout: 120_000 });
  assert.match(await page.locator("#model-card").textContent(), /SAElayer 29, 2304 latents, TopK \(k = 32\)/);
  await page.click("#read-latents");
  await page.locator("#latent-table").waitFor({ timeout: 120_000 });
  const rows = await page.locator("#latent-table tr").count();
  assert.equal(rows, 1 + 12, "a header and the 12 most active latents");
  const lens = await page.locator("#latent-table .lens").first().textContent();
  assert.ok(lens.length > 0, "each latent shows the tokens it promotes");
  // The middle layer's SAE, picked from the menu, is downloaded and read at the same token.
  assert.deepEqual(await page.locator("#sae-layer option").allTextContents(), ["20", "29"]);
  await page.selectOption("#sae-layer", "20");
  await page.click("#read-latents");
  await page.locator("#latents-panel p.hint", { hasText: "Layer 20, at the token" }).waitFor({ timeout: 120_000 });
  assert.match(await page.locator("#latents-panel").textContent(), /on resid_post of layer 20 \(shipped with the page: saes\/smollm2-135m\/layer_20\)/);
  assert.equal(await page.locator("#latent-table tr").count(), 1 + 12);
  // Another model: its own SAEs, and nothing left of the last model's reading.
  await page.selectOption("#model-select", "gemma-3-270m");
  await page.click("#load-button");
  await page.locator("#latents-panel", { hasText: "saes/gemma-3-270m/layer_17" }).waitFor({ timeout: 240_000 });
  assert.equal(await page.locator("#latent-table").count(), 0);
  assert.deepEqual(await page.locator("#sae-layer option").allTextContents(), ["9", "17"]);
  await page.click("#read-latents");
  await page.locator("#latents-panel p.hint", { hasText: "Layer 17, at the token" }).waitFor({ timeout: 120_000 });
  assert.deepEqual(problems, []);
  await context.close();
});

test("a damaged shipped SAE is reported and the model still works without it", async () => {
  const context = await browser.newContext();
  // The worker's download of the last layer's SAE gets 100 bytes of noise instead of the file.
  await context.route("**/saes/smollm2-135m/layer_29/params.safetensors", (route) =>
    route.fulfill({ status: 200, contentType: "application/octet-stream", body: Buffer.alloc(100, 7) }));
  const p = smolGolden.prompts[0];
  const { page, problems } = await openPage(context, "?chat=0&backend=cpu&text=" + encodeURIComponent(p.prompt));
  await page.locator("#model-card").waitFor({ timeout: 120_000 });
  await page.locator(".notice").waitFor({ timeout: 30_000 });
  assert.match(await page.locator(".notice").textContent(), /The SAE shipped for this model could not be loaded \(saes\/smollm2-135m\/layer_29: .+\); no latents\./);
  assert.equal(await page.locator("#latents-panel").count(), 0, "no latents panel without an SAE");
  await page.fill("#max-new-tokens", "8");
  await page.dispatchEvent("#max-new-tokens", "change");
  assert.deepEqual(await generate(page), p.greedy16_ids.slice(0, 8));
  assert.deepEqual(problems, []);
  await context.close();
});
