//! Self-profiling, only in a binary built with `--features profiling`: when
//! `WALSHUTTLE_PROFILE=/path/out.svg` is set, the process samples its own stacks about
//! 99 times a second (pprof, SIGPROF) and writes a flamegraph SVG there when the
//! command returns, also after a SIGTERM-triggered clean stop of `run`. Any failure is
//! logged and the command goes on unprofiled; it never changes the exit code.

use std::path::PathBuf;

/// Sampling frequency in Hz: prime, so it does not beat with periodic work.
const FREQUENCY: i32 = 99;

/// A running profile and where its flamegraph goes.
pub struct Profile {
    guard: pprof::ProfilerGuard<'static>,
    path: PathBuf,
}

/// Starts sampling when `WALSHUTTLE_PROFILE` names a file; `None` otherwise or when
/// the profiler cannot start (logged).
pub fn start() -> Option<Profile> {
    let path = PathBuf::from(std::env::var_os("WALSHUTTLE_PROFILE").filter(|p| !p.is_empty())?);
    match pprof::ProfilerGuardBuilder::default()
        .frequency(FREQUENCY)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
    {
        Ok(guard) => {
            tracing::info!(path = %path.display(), hz = FREQUENCY, "profiling: sampling this process");
            Some(Profile { guard, path })
        }
        Err(e) => {
            tracing::warn!("profiling: cannot start the profiler: {e}");
            None
        }
    }
}

impl Profile {
    /// Stops sampling and writes the flamegraph; errors are logged, never raised.
    pub fn finish(self) {
        let report = match self.guard.report().build() {
            Ok(report) => report,
            Err(e) => {
                tracing::warn!("profiling: cannot build the report: {e}");
                return;
            }
        };
        drop(self.guard);
        let samples: isize = report.data.values().sum();
        if samples == 0 {
            tracing::warn!(path = %self.path.display(), "profiling: no samples taken (the command ran too briefly): no flamegraph written");
            return;
        }
        let file = match std::fs::File::create(&self.path) {
            Ok(file) => file,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "profiling: cannot create the flamegraph file: {e}");
                return;
            }
        };
        match report.flamegraph(file) {
            Ok(()) => tracing::info!(
                path = %self.path.display(),
                samples,
                "profiling: flamegraph written"
            ),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "profiling: cannot write the flamegraph: {e}")
            }
        }
    }
}
