// Time to first token in the page for a model already in the browser's cache, as a returning visitor meets it: the
// visit (the page loads the model from the cache by itself), then a click on Generate until the first token shows.
// `make bench` runs it after bench.mjs. Prints one JSON line per model and backend: medians over the timed visits,
// and each visit's load steps as the model card states them.
//   node ttft.mjs [visits] [backends, comma-separated]
import { serve, launch } from "./serve.mjs";

const [visits = "3", backends = "cpu"] = process.argv.slice(2);
const prompt = "Write two sentences about the sea.";
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const { server, base } = await serve();
const browser = await launch();
try {
  for (const model of ["smollm2-135m-instruct", "gemma-3-270m"]) {
    for (const backend of backends.split(",")) {
      const context = await browser.newContext();
      const url = `${base}?model=${model}&backend=${backend}&text=${encodeURIComponent(prompt)}`;
      // The first visit downloads the model into the browser's cache; it is not timed.
      const first = await context.newPage();
      await first.goto(url);
      await first.locator("#model-card").waitFor({ timeout: 600_000 });
      await first.close();
      const runs = [];
      for (let i = 0; i < Number(visits); i++) {
        const page = await context.newPage();
        const opened = Date.now();
        await page.goto(url);
        await page.locator("#model-card").waitFor({ timeout: 600_000 });
        const card = await page.locator("#model-card").textContent();
        if (!/from the browser cache/.test(card)) throw new Error(`${model}: the timed visit did not read the cache`);
        await page.locator("#generate:enabled").waitFor({ timeout: 600_000 });
        const ready = Date.now();
        await page.click("#generate");
        await page.waitForFunction(() => document.querySelector("#output-default")?.textContent.length > 0, null,
          { timeout: 600_000, polling: "raf" });
        const shown = Date.now();
        await page.click("#stop");
        const stats = await page.locator("#generation-stats").textContent({ timeout: 600_000 });
        const steps = await page.locator("#model-card tr", { hasText: "Load steps" }).locator("td").textContent();
        runs.push({ visit: ready - opened, click: shown - ready, worker: Number(/first token after (\d+) ms/.exec(stats)[1]), steps });
        await page.close();
      }
      console.log(JSON.stringify({
        model, backend, visits: runs.length, prompt,
        visit_to_ready_ms: median(runs.map((r) => r.visit)),
        click_to_first_token_ms: median(runs.map((r) => r.click)),
        worker_first_token_ms: median(runs.map((r) => r.worker)),
        visit_to_first_token_ms: median(runs.map((r) => r.visit + r.click)),
        // The worker's own account of the load, from the model card, for each visit.
        load_steps: runs.map((r) => r.steps),
      }));
      await context.close();
    }
  }
} finally {
  await browser.close();
  server.close();
}
