//! The threads tasks run on, kept from one task to the next.
//!
//! A task runs on a thread other than its caller's so that the caller gets
//! its answer at the deadline even when the task is inside an engine call,
//! which cannot be interrupted (ADR 0012): the caller stops waiting and the
//! task is let go to finish that call on its own (its wasm traps at the next
//! epoch check, its result is dropped). Everything a task does — guest code,
//! host calls, engine computes — runs on that one thread, one hand-over per
//! task: a hand-over per compute cost ~80 µs each on these machines (a
//! sleeping thread's wake-up), 2–3% of the embed job, and a new thread per
//! task 1–2% more (cold caches, no per-thread engine scratch space; ADR
//! 0021, BENCHMARKS.md "The sandbox's own cost").
//!
//! So the threads are kept: a task takes the thread that went idle last (the
//! warmest). How many: one per task running at once (the node's slots) plus
//! those finishing an engine call after their task was let go; at most
//! [`MAX_IDLE`] wait idle, the rest end after their task.
//!
//! Never decides what runs or for how long: the sandbox gives the work and
//! its deadline.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

/// Idle task threads kept for later tasks; more than this end.
pub const MAX_IDLE: usize = 32;

/// One task's work, boxed to travel to a thread; it returns how to deliver
/// its answer, which the thread does once it is idle again (so that its
/// caller's next task finds it, warm, rather than start another).
type Work = Box<dyn FnOnce() -> Deliver + Send>;
/// Sends a finished task's answer to its caller.
type Deliver = Box<dyn FnOnce()>;

/// A task: running, finished, or let go by its caller.
const RUNNING: u8 = 0;
const FINISHED: u8 = 1;
const LET_GO: u8 = 2;

/// An idle thread: where to send its next task.
struct Idle(mpsc::Sender<Work>);

/// Idle threads, the most recently used last (taken first).
static IDLE: Mutex<Vec<Idle>> = Mutex::new(Vec::new());
/// Threads alive (idle or running a task).
static THREADS: AtomicUsize = AtomicUsize::new(0);
/// Tasks let go at their deadline that are still running.
static LET_GO_RUNNING: AtomicUsize = AtomicUsize::new(0);

/// How many tasks let go at their deadline are still running in this
/// process (each is inside an engine call, holding a thread and the
/// engine's memory until the call returns).
pub fn abandoned_computes() -> usize {
    LET_GO_RUNNING.load(Ordering::Relaxed)
}

/// How many task threads are alive in this process (idle or running).
pub fn task_threads() -> usize {
    THREADS.load(Ordering::Relaxed)
}

/// Why a task gave back no answer.
#[derive(Debug)]
pub(crate) enum Lost {
    /// The deadline passed; the task was let go and finishes on its own.
    LetGo,
    /// No thread could be started, or the work panicked (the message).
    Failed(String),
}

/// Run `work` on a task thread and wait for its answer until `deadline`.
pub(crate) fn run_until<T: Send + 'static>(
    deadline: Instant,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Lost> {
    let state = Arc::new(AtomicU8::new(RUNNING));
    // Capacity 1: the thread's answer never blocks it.
    let (answer, done) = mpsc::sync_channel::<std::thread::Result<T>>(1);
    let mine = state.clone();
    let mut job: Work = Box::new(move || {
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
        if mine
            .compare_exchange(RUNNING, FINISHED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            Box::new(move || {
                let _ = answer.send(out);
            })
        } else {
            // Its caller let it go at the deadline; nobody waits for it.
            drop(out);
            LET_GO_RUNNING.fetch_sub(1, Ordering::Relaxed);
            Box::new(|| ())
        }
    });
    // An idle thread cannot end, but a send is the only way to know: one
    // that did gives the work back for the next idle one or a new one.
    loop {
        let idle = IDLE.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let Some(Idle(thread)) = idle else {
            start(job).map_err(|e| Lost::Failed(format!("cannot start a task thread: {e}")))?;
            break;
        };
        match thread.send(job) {
            Ok(()) => break,
            Err(mpsc::SendError(back)) => job = back,
        }
    }
    let answer = match done.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(a) => a,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            if state
                .compare_exchange(RUNNING, LET_GO, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let running = LET_GO_RUNNING.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    still_running = running,
                    "a task was still in an engine call at its deadline; it ends now and the call finishes on its own"
                );
                return Err(Lost::LetGo);
            }
            // It finished just as the deadline passed: take the answer.
            done.recv().map_err(|_| ended())?
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => return Err(ended()),
    };
    answer.map_err(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Lost::Failed(format!("the task's thread panicked: {why}"))
    })
}

fn ended() -> Lost {
    Lost::Failed("the task's thread ended without an answer".into())
}

/// Start a task thread with `first` as its first work.
fn start(first: Work) -> std::io::Result<()> {
    let (jobs, rx) = mpsc::channel::<Work>();
    // Queued before the thread exists; cannot fail while `rx` lives.
    let _ = jobs.send(first);
    THREADS.fetch_add(1, Ordering::Relaxed);
    let spawned = std::thread::Builder::new()
        .name("tidepool-task".into())
        .spawn(move || {
            let _alive = Alive;
            while let Ok(work) = rx.recv() {
                let deliver = work();
                // Idle again; past the cap, this thread ends instead.
                let kept = {
                    let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
                    let kept = idle.len() < MAX_IDLE;
                    if kept {
                        idle.push(Idle(jobs.clone()));
                    }
                    kept
                };
                deliver();
                if !kept {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        THREADS.fetch_sub(1, Ordering::Relaxed);
        return Err(e);
    }
    Ok(())
}

/// Counts a thread down when it ends, however it ends.
struct Alive;

impl Drop for Alive {
    fn drop(&mut self) {
        THREADS.fetch_sub(1, Ordering::Relaxed);
    }
}
