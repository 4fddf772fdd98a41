//! Environment leases: one run per environment at a time, across processes.
//!
//! An environment is a blueprint on a provider (`local:shop`). A lease is an exclusive `flock`
//! on `STATE/leases/ENV.lock`, so a CLI run and a run of `dryrun serve` on the same state
//! directory never overlap, and the kernel releases the lease when its holder dies, however it
//! dies. The holder writes its run id into the file for the "waiting for …" message.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::StateDir;

/// Lease errors.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The lease file could not be opened.
    #[error("lease {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting was cancelled.
    #[error("cancelled while waiting for environment {0}")]
    Cancelled(String),
}

/// The environment key of a blueprint on a provider.
#[must_use]
pub fn environment(provider: &str, blueprint: &str) -> String {
    format!("{provider}:{blueprint}")
}

/// A held lease; dropping it releases the environment.
#[derive(Debug)]
pub struct Lease {
    file: File,
    env: String,
}

impl Lease {
    /// The environment held.
    #[must_use]
    pub fn environment(&self) -> &str {
        &self.env
    }

    /// Records the run that holds the lease (shown to waiters).
    pub fn set_holder(&mut self, run_id: &str) {
        let _ = self.file.set_len(0);
        let _ = self.file.rewind();
        let _ = self.file.write_all(run_id.as_bytes());
        let _ = self.file.flush();
    }
}

fn path(state: &StateDir, env: &str) -> PathBuf {
    let safe: String = env
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    state.root().join("leases").join(format!("{safe}.lock"))
}

/// Takes the lease if it is free.
///
/// # Errors
/// I/O errors opening the lease file.
pub fn try_acquire(state: &StateDir, env: &str) -> Result<Option<Lease>, LeaseError> {
    let p = path(state, env);
    let io = |source| LeaseError::Io {
        path: p.clone(),
        source,
    };
    crate::state::create_private_dir(p.parent().unwrap_or(state.root())).map_err(io)?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&p)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(Lease {
            file,
            env: env.to_string(),
        })),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// The run id that holds the environment, if any is recorded.
#[must_use]
pub fn holder(state: &StateDir, env: &str) -> Option<String> {
    let mut s = String::new();
    File::open(path(state, env))
        .ok()?
        .read_to_string(&mut s)
        .ok()?;
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Waits for the lease, polling; `on_wait` is called once when the first attempt finds it held.
///
/// # Errors
/// [`LeaseError::Cancelled`] when `cancel` fires first; I/O errors.
pub async fn acquire(
    state: &StateDir,
    env: &str,
    cancel: &CancellationToken,
    mut on_wait: impl FnMut(Option<String>),
) -> Result<Lease, LeaseError> {
    let mut told = false;
    loop {
        if let Some(l) = try_acquire(state, env)? {
            return Ok(l);
        }
        if !told {
            on_wait(holder(state, env));
            told = true;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = cancel.cancelled() => return Err(LeaseError::Cancelled(env.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_per_environment_and_release_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let mut a = try_acquire(&state, "local:shop").unwrap().unwrap();
        a.set_holder("run-a");
        assert!(try_acquire(&state, "local:shop").unwrap().is_none());
        assert!(
            try_acquire(&state, "local:blog").unwrap().is_some(),
            "other environments are independent"
        );
        assert_eq!(holder(&state, "local:shop").as_deref(), Some("run-a"));
        let cancel = CancellationToken::new();
        let waiter = {
            let state = state.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                acquire(&state, "local:shop", &cancel, |_| {})
                    .await
                    .map(|l| l.environment().to_string())
            })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!waiter.is_finished());
        drop(a);
        assert_eq!(waiter.await.unwrap().unwrap(), "local:shop");
    }
}
