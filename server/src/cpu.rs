//! Work that may hold a core for long: password hashing (argon2) and document work on
//! large writes and loads (automerge on megabytes of text).
//!
//! Such work runs on a thread of its own with its scheduling priority lowered by
//! `limits.heavy_work_nice` steps (the per-thread nice value; default [`DEFAULT_NICE`]),
//! and document work also under Linux's `SCHED_IDLE` policy (`limits.heavy_work_idle`, on
//! by default). When the cores are idle it runs at full speed; when ordinary requests want
//! them, the scheduler gives those first. So a flood of expensive requests — logins with
//! wrong passwords, multi-megabyte text PUTs — slows those requests, not everyone else's.
//! How many run at once is bounded by their callers (`access.password_hash_concurrency`,
//! one actor per resource).
//!
//! A lower nice value alone was not enough for document work: the kernel's scheduler
//! (EEVDF) lets a running nice-10 thread finish its slice before a request's thread that
//! wakes, and in the abuse benchmark the normal clients' p99 came out no better than at
//! nice 0; an idle-policy thread is preempted at once. Password hashing is kept out of the
//! idle policy: under a load that leaves no core free an idle-policy thread barely runs,
//! and a person logging in should not wait out a flood of big writes.
//!
//! Knows of the work only which of those two kinds ([`Heavy`]) it is. Lowering a
//! thread's priority needs no privilege; raising it back would, which is why the thread is fresh and ends with the work (a
//! thread costs tens of microseconds; the work it carries costs milliseconds or more).

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// How much lower the priority of heavy work is than the process's, by default (nice
/// steps; 19 is the lowest priority Linux has).
pub const DEFAULT_NICE: i32 = 10;

/// `limits.heavy_work_nice` of this process.
static NICE: AtomicI32 = AtomicI32::new(DEFAULT_NICE);

/// `limits.heavy_work_idle` of this process.
static IDLE: AtomicBool = AtomicBool::new(true);

/// Sets how much lower heavy work runs (`limits.heavy_work_nice`, 0 to 19), for the
/// whole process.
pub fn set_nice(steps: i32) {
    NICE.store(steps.clamp(0, 19), Ordering::Relaxed);
}

/// What heavy work is, for how far it yields to requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heavy {
    /// Automerge work on big writes and loads: `limits.heavy_work_nice`, and `SCHED_IDLE`
    /// if `limits.heavy_work_idle`.
    Document,
    /// Password hashing: `limits.heavy_work_nice` only.
    Password,
}

/// Runs `f` to completion on a fresh thread at lower CPU priority and returns its result;
/// a panic in `f` is resumed on the caller's thread. Blocks the calling thread: from async
/// code, call it inside `spawn_blocking` or `block_in_place`. If no thread can be started,
/// `f` runs here at the caller's priority.
pub fn heavy<T: Send>(kind: Heavy, f: impl FnOnce() -> T + Send) -> T {
    let mut f = Some(f);
    let ran = std::thread::scope(|s| {
        let spawned = std::thread::Builder::new()
            .name("plait-heavy".into())
            .spawn_scoped(s, || {
                lower_priority(kind);
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

/// Document work on more than this many bytes (a large write, loading a long history,
/// saving a big document) is moved off the async workers, which other connections need.
pub const HEAVY_DOCUMENT_BYTES: u64 = 256 * 1024;

/// Runs document work `f` from async code: at once when it is not `heavy`; else off the
/// async workers, on a thread of lower priority ([`heavy`]), the worker handing its other
/// tasks on meanwhile (`block_in_place`) on a multi-threaded runtime.
pub fn document_work<T: Send>(heavy: bool, f: impl FnOnce() -> T + Send) -> T {
    if !heavy {
        return f();
    }
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let run = || self::heavy(Heavy::Document, f);
    if multi_thread {
        tokio::task::block_in_place(run)
    } else {
        run()
    }
}

/// Whether heavy work runs under `SCHED_IDLE` (`limits.heavy_work_idle`), for the whole
/// process.
pub fn set_idle(on: bool) {
    IDLE.store(on, Ordering::Relaxed);
}

/// Runs `f` and returns its result with the CPU time the calling thread spent in it (not
/// the time it waited for a core): what the work cost, whatever else the machine was doing.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, std::time::Duration) {
    let start = thread_cpu_time();
    let out = f();
    (out, thread_cpu_time().saturating_sub(start))
}

/// CPU time the calling thread has used.
fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the calling thread's own clock into a valid timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Lowers the calling thread's priority for `kind` of work.
fn lower_priority(kind: Heavy) {
    #[cfg(target_os = "linux")]
    if kind == Heavy::Document && IDLE.load(Ordering::Relaxed) {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: a system call on the calling thread (0) with a valid parameter.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
            tracing::debug!(
                "could not put a heavy thread under SCHED_IDLE: {}",
                std::io::Error::last_os_error()
            );
        }
    }
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
        let inside = heavy(Heavy::Password, || {
            borrowed.push(4);
            my_nice()
        });
        assert_eq!(borrowed, [1, 2, 3, 4], "the work may borrow from the caller");
        assert_eq!(inside, (before + NICE.load(Ordering::Relaxed)).min(19));
        assert_eq!(my_nice(), before, "the caller's thread is untouched");
    }

    #[test]
    fn document_work_runs_under_the_idle_policy_and_password_hashing_does_not() {
        // SAFETY: reads the calling thread's own policy.
        let policy = || unsafe { libc::sched_getscheduler(0) };
        let before = policy();
        let inside = heavy(Heavy::Document, policy);
        assert_eq!(inside, libc::SCHED_IDLE, "the default (limits.heavy_work_idle)");
        assert_eq!(heavy(Heavy::Password, policy), before);
        assert_eq!(policy(), before, "the caller's thread is untouched");
    }

    #[test]
    fn timed_work_counts_the_cpu_it_used_not_the_time_it_slept() {
        let ((), slept) = timed(|| std::thread::sleep(std::time::Duration::from_millis(50)));
        assert!(
            slept < std::time::Duration::from_millis(5),
            "sleeping is not work: {slept:?}"
        );
        let (_, spun) = timed(|| {
            let t = std::time::Instant::now();
            let mut x = 0u64;
            while t.elapsed() < std::time::Duration::from_millis(50) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            x
        });
        // However few of those 50 ms the thread got on a busy machine, it got some.
        assert!(
            spun >= std::time::Duration::from_millis(1),
            "spinning is: {spun:?}"
        );
    }

    #[test]
    fn a_panic_in_heavy_work_reaches_the_caller() {
        let caught = std::panic::catch_unwind(|| heavy(Heavy::Document, || panic!("in the heavy thread")));
        let msg = caught.expect_err("panics").downcast::<&str>().map(|s| *s);
        assert_eq!(msg.ok(), Some("in the heavy thread"));
    }
}
