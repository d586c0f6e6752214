// The app's benchmark page, driven in headless Chromium for each backend and model: `make bench` runs it after
// `saif bench`, so browser figures sit beside native ones from the same run. Prints one JSON line per run.
//   node bench.mjs [prompt_tokens] [decode_tokens] [runs]
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const [promptTokens = "32", decodeTokens = "16", runs = "3"] = process.argv.slice(2);
const dist = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../dist");
const types = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".css": "text/css" };
const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  const file = path.join(dist, decodeURIComponent(url.pathname === "/" ? "/index.html" : url.pathname));
  if (!file.startsWith(dist) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
    res.writeHead(404);
    return res.end();
  }
  res.writeHead(200, { "content-type": types[path.extname(file)] ?? "application/octet-stream", "content-length": fs.statSync(file).size });
  fs.createReadStream(file).pipe(res);
});
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
const base = `http://127.0.0.1:${server.address().port}/`;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--enable-unsafe-webgpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"],
});
try {
  for (const model of ["smollm2-135m-instruct", "gemma-3-270m"]) {
    for (const backend of ["webgpu", "cpu"]) {
      const page = await browser.newPage();
      await page.goto(`${base}?model=${model}&backend=${backend}&chat=0`);
      await page.locator("#model-card").waitFor({ timeout: 300_000 });
      await page.click("#bench-panel summary");
      for (const [field, value] of [["Prompt tokens", promptTokens], ["Decoded tokens", decodeTokens], ["Runs", runs]]) {
        const input = page.locator("#bench-panel label", { hasText: field }).locator("input");
        await input.fill(value);
        await input.dispatchEvent("change");
      }
      await page.click("#run-bench");
      await page.locator("#bench-results").waitFor({ timeout: 1_800_000 });
      const rows = await page.locator("#bench-results tr").evaluateAll((trs) =>
        Object.fromEntries(trs.map((tr) => [tr.querySelector("th").textContent, tr.querySelector("td").textContent])));
      console.log(JSON.stringify({ model, backend, ...rows }));
      await page.close();
    }
  }
} finally {
  await browser.close();
  server.close();
}
