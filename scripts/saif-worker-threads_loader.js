// The threaded engine worker's entry (a module worker, started by the page where it is cross-origin isolated):
// instantiating the module runs the worker's main, which starts the thread pool and takes requests. A failure to
// load is rethrown outside the promise, so that it reaches the page as the worker's error event and the page
// starts the one-thread worker instead (src/ui/client.rs); a rejected promise alone would not be reported.
import init from "./saif-worker-threads.js";
init().catch((e) => setTimeout(() => {
  throw new Error(`the threaded engine could not load: ${e?.message ?? e}`);
}));
