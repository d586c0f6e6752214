//! A team of threads that stays awake through one forward pass of the CPU path, so that each of a decoding step's
//! ~150 short parallel products starts at once on every thread.
//!
//! Between two products the pass runs a few to tens of microseconds of sequential work (norms, rounding the
//! activations, attention). Rayon's idle workers go to sleep after a short spin, and waking one costs a futex and,
//! in a virtual machine, an interrupt to the halted core: on a 2-core Xeon VM a condvar round trip measured 68-76
//! us, and rayon added 24-80 us to a 20-80 us parallel section that followed 20-100 us of sequential work
//! (docs/benchmarks.md). llama.cpp's threads spin between operations for the same reason.
//!
//! `with_team` runs a pass with the pool's other threads spinning in `Team::help` (rayon jobs of a scope, so the
//! browser's threaded build, where rayon's threads are web workers, gets them too); `for_each` hands the pass's
//! parallel loops to them, or to rayon outside a team. Tasks are claimed one at a time from a single atomic word
//! that holds the job's generation, its task count and the next task, so a helper can never run a task of a job
//! that has ended.
// The plain wasm build has no threads: its passes run without a team, and `for_each` runs its tasks in a plain
// loop. Through rayon's fallback there (the page's one thread as its pool), a third of the page visits after
// 0141447 read a 32-token prompt 1.2-2.5x slower, the same build's other visits not; in a plain loop, none of 16
// (docs/benchmarks.md).
#![cfg_attr(all(target_arch = "wasm32", not(target_feature = "atomics")), allow(dead_code))]

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[cfg(any(not(target_arch = "wasm32"), target_feature = "atomics"))]
use rayon::prelude::*;

/// A job's tasks: `run(i)` for every i below the count.
type Tasks<'a> = &'a (dyn Fn(usize) + Sync);

/// Bits of `Team::state` for the task count and the next task (20 each), the rest for the generation.
const INDEX_BITS: u32 = 20;
const INDEX_MASK: u64 = (1 << INDEX_BITS) - 1;

/// Idle spins of a helper before it starts yielding its core at each spin (about a millisecond), for machines
/// with fewer cores than threads.
const SPINS_BEFORE_YIELDING: u32 = 1 << 16;

fn generation(state: u64) -> u64 {
    state >> (2 * INDEX_BITS)
}

fn count(state: u64) -> usize {
    ((state >> INDEX_BITS) & INDEX_MASK) as usize
}

fn next(state: u64) -> usize {
    (state & INDEX_MASK) as usize
}

/// The threads of one pass and the job they share.
pub struct Team {
    /// (generation, task count, next task). A job's generation changes only after all its tasks are done.
    state: AtomicU64,
    /// The job's tasks, published before its generation: a pointer to the poster's `Tasks`.
    tasks: AtomicPtr<Tasks<'static>>,
    /// Tasks of the current job that have finished.
    done: AtomicUsize,
    /// The first panic of a task on a helper, for the poster to resume.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    stop: AtomicBool,
}

thread_local! {
    /// The team of the pass this thread runs, if any.
    static CURRENT: Cell<Option<*const Team>> = const { Cell::new(None) };
}

/// Runs `pass` on this thread with the rest of rayon's pool spinning as its team, spawned into `scope`; `pass`'s
/// `for_each` loops run on the team. The helpers stop when `pass` returns or panics.
pub fn with_team<'s, R>(scope: &rayon::Scope<'s>, pass: impl FnOnce() -> R) -> R {
    let team = Arc::new(Team {
        state: AtomicU64::new(0),
        tasks: AtomicPtr::new(std::ptr::null_mut()),
        done: AtomicUsize::new(0),
        panic: Mutex::new(None),
        stop: AtomicBool::new(false),
    });
    for _ in 1..rayon::current_num_threads() {
        let helper = team.clone();
        scope.spawn(move |_| helper.help());
    }
    /// Ends the team and forgets it on this thread, also when the pass panics (else the scope would wait on the
    /// helpers forever).
    struct Ending<'a>(&'a Team, Option<*const Team>);
    impl Drop for Ending<'_> {
        fn drop(&mut self) {
            CURRENT.with(|current| current.set(self.1));
            self.0.stop.store(true, Ordering::Release);
        }
    }
    let _ending = Ending(&team, CURRENT.with(|current| current.replace(Some(Arc::as_ptr(&team)))));
    pass()
}

/// `run(i)` for every i in `0..count`, in parallel: on the pass's team where this thread runs one, else on
/// rayon's pool (one after the other in the plain wasm build, which has no threads). Returns when all have run.
pub fn for_each(count: usize, run: impl Fn(usize) + Sync) {
    let team = CURRENT.with(Cell::get);
    match team {
        Some(team) if count > 1 && count <= INDEX_MASK as usize => {
            // SAFETY: `with_team` keeps the team alive while it is this thread's current one.
            let team = unsafe { &*team };
            // A task that loops in parallel again runs that loop on rayon's pool (on this thread alone while the
            // helpers spin), not on the team, whose job is this one.
            CURRENT.with(|current| current.set(None));
            let outcome = catch_unwind(AssertUnwindSafe(|| team.run(count, &run)));
            CURRENT.with(|current| current.set(Some(team)));
            if let Err(panic) = outcome {
                resume_unwind(panic);
            }
        }
        #[cfg(any(not(target_arch = "wasm32"), target_feature = "atomics"))]
        _ => (0..count).into_par_iter().for_each(&run),
        #[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
        _ => (0..count).for_each(&run),
    }
}

/// `make(i)` for every i in `0..count`, in parallel as `for_each`, in order.
pub fn map<T: Send>(count: usize, make: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let slots: Vec<Mutex<Option<T>>> = (0..count).map(|_| Mutex::new(None)).collect();
    for_each(count, |i| *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(make(i)));
    slots
        .into_iter()
        .map(|slot| slot.into_inner().unwrap_or_else(|e| e.into_inner()).expect("every task ran"))
        .collect()
}

/// `run(i, part)` for each of `parts` (the i-th), in parallel as `for_each`, each part moved into the one task
/// that runs it: a block of an output's rows, or a sequence with its rows of the output.
pub fn for_each_part<T: Send>(parts: impl IntoIterator<Item = T>, run: impl Fn(usize, T) + Sync) {
    let parts = Parts::new(parts);
    for_each(parts.0.len(), |i| run(i, parts.take(i)));
}

/// `for_each_part` where `parallel`, else `run(i, part)` for each part in order on this thread: for the loops whose
/// work is worth handing to the team only from some size on.
pub fn for_each_part_if<T: Send>(parallel: bool, parts: impl IntoIterator<Item = T>, run: impl Fn(usize, T) + Sync) {
    match parallel {
        true => for_each_part(parts, run),
        false => parts.into_iter().enumerate().for_each(|(i, part)| run(i, part)),
    }
}

/// Parts that tasks take by index, each once. The lock is never contended: the task of index i is the only one
/// that takes part i.
struct Parts<T>(Vec<Mutex<Option<T>>>);

impl<T> Parts<T> {
    fn new(parts: impl IntoIterator<Item = T>) -> Self {
        Self(parts.into_iter().map(|p| Mutex::new(Some(p))).collect())
    }

    fn take(&self, i: usize) -> T {
        self.0[i].lock().unwrap_or_else(|e| e.into_inner()).take().expect("each task runs once")
    }
}

impl Team {
    /// Posts `count` tasks, works on them with the helpers, and returns when all are done.
    fn run(&self, count: usize, run: Tasks) {
        // The helpers read the tasks through this pointer only while a task of this job is unfinished, and the job
        // ends below only when all are finished.
        let published: *const Tasks = &run;
        self.tasks.store(published as *mut Tasks<'static>, Ordering::Release);
        self.done.store(0, Ordering::Relaxed);
        let state = self.state.load(Ordering::Relaxed);
        let job = ((generation(state) + 1) << (2 * INDEX_BITS)) | ((count as u64) << INDEX_BITS);
        self.state.store(job, Ordering::Release);
        self.work();
        while self.done.load(Ordering::Acquire) < count {
            std::hint::spin_loop();
        }
        if let Some(panic) = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            resume_unwind(panic);
        }
    }

    /// Runs tasks of the current job until none is left to claim; returns whether it ran any.
    fn work(&self) -> bool {
        let mut ran = false;
        loop {
            let state = self.state.load(Ordering::Acquire);
            if next(state) >= count(state) {
                return ran;
            }
            // Read before the claim: if the claim below succeeds, the state did not change in between, so this
            // job had unclaimed tasks all along and its tasks pointer was still the one published with it.
            let tasks = self.tasks.load(Ordering::Acquire);
            if self.state.compare_exchange_weak(state, state + 1, Ordering::AcqRel, Ordering::Acquire).is_err() {
                continue;
            }
            // SAFETY: the claimed task is unfinished, so the poster is still in `run`, holding the tasks.
            let run = unsafe { *tasks };
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(next(state)))) {
                self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(panic);
            }
            self.done.fetch_add(1, Ordering::Release);
            ran = true;
        }
    }

    /// A helper's loop: work on each job as it is posted, spinning in between, until the pass ends.
    fn help(&self) {
        let mut idle = 0u32;
        while !self.stop.load(Ordering::Acquire) {
            if self.work() {
                idle = 0;
            } else if idle < SPINS_BEFORE_YIELDING {
                idle += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every task of every job runs exactly once, on a team and without one, and panics reach the poster.
    #[test]
    fn each_task_runs_once_and_panics_reach_the_poster() {
        let counts: Vec<usize> = (0..300).map(|j| 1 + (j * 7) % 40).collect();
        let check = || {
            for &n in &counts {
                let runs: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for_each(n, |i| {
                    runs[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) == 1), "{n} tasks");
                assert_eq!(map(n, |i| i * i), (0..n).map(|i| i * i).collect::<Vec<_>>());
                // Each part reaches the task of its index, on the team or not: each task writes its index into
                // its own part.
                for parallel in [true, false] {
                    let mut parts = vec![usize::MAX; n];
                    for_each_part_if(parallel, parts.iter_mut(), |i, part| *part = i);
                    assert_eq!(parts, (0..n).collect::<Vec<_>>(), "{n} parts, in parallel: {parallel}");
                }
            }
        };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        pool.install(|| rayon::scope(|scope| with_team(scope, check)));
        check();
        let caught = pool.install(|| {
            catch_unwind(AssertUnwindSafe(|| {
                rayon::scope(|scope| with_team(scope, || for_each(8, |i| assert_ne!(i, 5, "task 5"))))
            }))
        });
        assert!(caught.is_err(), "a task's panic reaches the pass");
    }
}
