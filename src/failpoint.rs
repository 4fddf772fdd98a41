//! Crash points for the reliability tests (cargo feature `failpoints`, off in normal builds).
//!
//! Every side effect of a run is bracketed by [`point`] calls: each journal write, each
//! provider create, restore, install and delete. With `DRYRUN_CRASH_AT=N` the process aborts
//! (SIGABRT, no unwinding, no destructors: as hard as a crash gets from inside) at the N-th
//! point it passes; with `DRYRUN_FAILPOINT_LOG=FILE` it appends `N NAME` for every point, so a
//! test can count the points of a run and then crash at each one in turn
//! (tests/crash.rs: `crash_at_every_failpoint_then_cleanup_leaves_nothing`).
//! Without the feature, [`point`] is an empty inline function.

#[cfg(feature = "failpoints")]
mod imp {
    use std::io::Write;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static PASSED: AtomicU64 = AtomicU64::new(0);

    fn crash_at() -> Option<u64> {
        static AT: OnceLock<Option<u64>> = OnceLock::new();
        *AT.get_or_init(|| {
            std::env::var("DRYRUN_CRASH_AT")
                .ok()
                .and_then(|v| v.parse().ok())
        })
    }

    pub fn point(name: &str) {
        let n = PASSED.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(path) = std::env::var_os("DRYRUN_FAILPOINT_LOG")
            && let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        {
            let _ = writeln!(f, "{n} {name}");
        }
        if crash_at() == Some(n) {
            eprintln!("failpoint {n} ({name}): aborting");
            std::process::abort();
        }
    }
}

/// Marks a side-effect point (see the module docs).
#[inline]
pub fn point(name: &str) {
    #[cfg(feature = "failpoints")]
    imp::point(name);
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
