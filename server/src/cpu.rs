//! Work that may hold a core for long: password hashing (argon2) and document work on
//! large writes and loads (automerge on megabytes of text).
//!
//! Such work runs on a thread of its own whose scheduling priority is lowered by
//! `limits.heavy_work_nice` steps (Linux's per-thread nice value; default
//! [`DEFAULT_NICE`]). When the cores are idle it runs at full
//! speed; when ordinary requests want them, the scheduler gives those first (a nice-10
//! thread gets about a tenth of a core's share against a nice-0 one). So a flood of
//! expensive requests — logins with wrong passwords, multi-megabyte text PUTs — slows
//! those requests, not everyone else's. How many run at once is bounded by their callers
//! (`access.password_hash_concurrency`, one actor per resource).
//!
//! Knows nothing of what the work is. Lowering a thread's priority needs no privilege;
//! raising it back would, which is why the thread is fresh and ends with the work (a
//! thread costs tens of microseconds; the work it carries costs milliseconds or more).

use std::sync::atomic::{AtomicI32, Ordering};

/// How much lower the priority of heavy work is than the process's, by default (nice
/// steps; 19 is the lowest priority Linux has).
pub const DEFAULT_NICE: i32 = 10;

/// `limits.heavy_work_nice` of this process.
static NICE: AtomicI32 = AtomicI32::new(DEFAULT_NICE);

/// Sets how much lower heavy work runs (`limits.heavy_work_nice`, 0 to 19), for the
/// whole process.
pub fn set_nice(steps: i32) {
    NICE.store(steps.clamp(0, 19), Ordering::Relaxed);
}

/// Runs `f` to completion on a fresh thread at lower CPU priority and returns its result;
/// a panic in `f` is resumed on the caller's thread. Blocks the calling thread: from async
/// code, call it inside `spawn_blocking` or `block_in_place`. If no thread can be started,
/// `f` runs here at the caller's priority.
pub fn heavy<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let mut f = Some(f);
    let ran = std::thread::scope(|s| {
        let spawned = std::thread::Builder::new()
            .name("plait-heavy".into())
            .spawn_scoped(s, || {
                lower_priority();
                (f.take().expect("taken once"))()
            });
        spawned
            .ok()
            .map(|t| t.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    });
    match ran {
        Some(out) => out,
        None => (f.take().expect("not taken when the thread did not start"))(),
    }
}

/// Lowers the calling thread's priority by `limits.heavy_work_nice`.
fn lower_priority() {
    let steps = NICE.load(Ordering::Relaxed);
    #[cfg(target_os = "linux")]
    if steps > 0 {
        // SAFETY: plain system calls on the calling thread's id; no memory is shared.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            let now = libc::getpriority(libc::PRIO_PROCESS, tid);
            let to = (now + steps).min(19);
            if libc::setpriority(libc::PRIO_PROCESS, tid, to) != 0 {
                tracing::debug!(
                    "could not lower a heavy thread's priority: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn my_nice() -> i32 {
        // SAFETY: reads the calling thread's own priority.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn heavy_work_runs_at_lower_priority_and_the_caller_keeps_its_own() {
        let mut borrowed = vec![1, 2, 3];
        let before = my_nice();
        let inside = heavy(|| {
            borrowed.push(4);
            my_nice()
        });
        assert_eq!(borrowed, [1, 2, 3, 4], "the work may borrow from the caller");
        assert_eq!(inside, (before + NICE.load(Ordering::Relaxed)).min(19));
        assert_eq!(my_nice(), before, "the caller's thread is untouched");
    }

    #[test]
    fn a_panic_in_heavy_work_reaches_the_caller() {
        let caught = std::panic::catch_unwind(|| heavy(|| panic!("in the heavy thread")));
        let msg = caught.expect_err("panics").downcast::<&str>().map(|s| *s);
        assert_eq!(msg.ok(), Some("in the heavy thread"));
    }
}
