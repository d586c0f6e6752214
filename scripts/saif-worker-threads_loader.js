// The threaded engine worker's entry (a module worker, started by the page where it is cross-origin isolated):
// instantiating the module runs the worker's main, which starts the thread pool and then takes requests.
import init from "./saif-worker-threads.js";
init();
