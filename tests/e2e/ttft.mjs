// Time to first token in the page for a model already in the browser's cache, as a returning visitor meets it: the
// visit (the page loads the model from the cache by itself), then a click on Generate until the first token shows,
// timed by the page's own clock from the start of the navigation (the browser's performance.now()), frame by frame.
// `make bench` runs it after bench.mjs. Prints one JSON line per model and backend: medians over the timed visits,
// and each visit's load steps as the model card states them.
//   node ttft.mjs [visits] [backends, comma-separated]      (TTFT_MODELS=gemma-3-270m: only that model)
// The page is cross-origin isolated (the CPU path on threads) unless TTFT_ISOLATED=0.
import { serve, launch } from "./serve.mjs";

const [visits = "3", backends = "cpu"] = process.argv.slice(2);
const prompt = "Write two sentences about the sea.";
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const { server, base } = await serve({ isolated: process.env.TTFT_ISOLATED !== "0" });
const browser = await launch();
try {
  for (const model of (process.env.TTFT_MODELS ?? "smollm2-135m-instruct,gemma-3-270m").split(",")) {
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
        // The page's own clock (ms since the navigation began), read every frame, as the visitor would see it:
        // when Generate became usable, when it was clicked, and the first frame with an output token.
        await page.addInitScript(() => {
          const t = (window.__ttft = {});
          document.addEventListener("click", (e) => {
            if (e.target.closest?.("#generate") && t.click === undefined) t.click = e.timeStamp;
          }, true);
          const frame = (now) => {
            const generate = document.querySelector("#generate");
            if (t.ready === undefined && generate && !generate.disabled && document.querySelector("#model-card")) t.ready = now;
            if (t.click !== undefined && document.querySelector("#output-default")?.textContent.length > 0) t.shown = now;
            if (t.shown === undefined) requestAnimationFrame(frame);
          };
          requestAnimationFrame(frame);
        });
        await page.goto(url);
        await page.locator("#model-card").waitFor({ timeout: 600_000 });
        const card = await page.locator("#model-card").textContent();
        if (!/from the browser cache/.test(card)) throw new Error(`${model}: the timed visit did not read the cache`);
        await page.locator("#generate:enabled").waitFor({ timeout: 600_000 });
        await page.click("#generate");
        await page.waitForFunction(() => window.__ttft.shown !== undefined, null, { timeout: 300_000 }).catch(async (e) => {
          console.error("no first token shown:", JSON.stringify(await page.evaluate(() => window.__ttft)));
          throw e;
        });
        const t = await page.evaluate(() => window.__ttft);
        await page.click("#stop");
        const stats = await page.locator("#generation-stats").textContent({ timeout: 600_000 });
        const stepsRow = page.locator("#model-card tr", { hasText: "Load steps" });
        const steps = (await stepsRow.count()) ? await stepsRow.locator("td").textContent() : "(not stated by this build)";
        runs.push({ visit: t.ready, click: t.shown - t.click, worker: Number(/first token after (\d+) ms/.exec(stats)[1]), steps });
        await page.close();
      }
      console.log(JSON.stringify({
        model, backend, visits: runs.length, prompt,
        visit_to_ready_ms: median(runs.map((r) => r.visit)),
        click_to_first_token_ms: median(runs.map((r) => r.click)),
        worker_first_token_ms: median(runs.map((r) => r.worker)),
        // With a click the moment Generate is usable.
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
