//! The outbox: callbacks and notifications are rows in the control plane (through
//! [`crate::control::Control`]: `history.sqlite`, or the shared PostgreSQL database), delivered
//! by one background task per server process with retries and exponential backoff.
//!
//! # Guarantees
//! - A run hands its messages to the outbox and ends: its environment, its concurrency slot and
//!   its lease are free before anything is sent, so a slow receiver stalls no queue.
//! - Messages survive a restart (and a crash): what was not delivered is sent when the server
//!   starts again; with several workers sharing the PostgreSQL control plane, any worker's
//!   task takes a due message, and one a dead worker had taken comes due again after its hold
//!   (`HOLD`, 60 s). Delivery is at least once; a callback carries the same
//!   `X-Dryrun-Delivery` on every attempt, so a receiver can drop repeats.
//! - At most [`PARALLEL`] messages are in flight; each attempt has the HTTP client's 10 s limit.
//! - Redirects are never followed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::notify::{self, Outbox};
use crate::control::{OutboxItem, OutboxKind};

/// Messages delivered at once.
pub const PARALLEL: usize = 4;

/// How long a message taken for delivery is held from other workers; past it (this worker
/// died), it is due again.
const HOLD: Duration = Duration::from_secs(60);

/// Longest wait between two attempts of one message.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Starts the delivery task; it ends when `stop` fires (undelivered messages stay queued).
pub fn start(out: &Arc<Outbox>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let out = out.clone();
    tokio::spawn(async move {
        let inflight: Arc<Mutex<HashSet<i64>>> = Arc::default();
        let slots = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let free = slots.available_permits();
            let due = if free == 0 {
                Vec::new()
            } else {
                out.control
                    .outbox_claim(free, HOLD)
                    .await
                    .unwrap_or_default()
            };
            for item in due {
                if !inflight
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(item.id)
                {
                    continue;
                }
                let out = out.clone();
                let inflight = inflight.clone();
                let slots = slots.clone();
                out.busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tasks.spawn(async move {
                    let _permit = slots.acquire_owned().await;
                    attempt(&out, item.clone()).await;
                    out.busy.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    inflight
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&item.id);
                    out.wake.notify_one();
                });
            }
            while tasks.try_join_next().is_some() {}
            // Sleep until the next message is due (at most a second: a message queued by
            // another process sharing the database is picked up too), a new one is queued, or
            // the server stops.
            let wait = out
                .control
                .outbox_next()
                .await
                .ok()
                .flatten()
                .and_then(|t| (t - Utc::now()).to_std().ok())
                .unwrap_or(Duration::ZERO)
                .clamp(Duration::from_millis(20), Duration::from_secs(1));
            tokio::select! {
                () = out.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => break,
            }
        }
        tasks.abort_all();
    })
}

/// Waits until no message is being delivered or due now, at most `limit`.
pub async fn flush(out: &Outbox, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        let due_now = out
            .control
            .outbox_next()
            .await
            .ok()
            .flatten()
            .is_some_and(|t| t <= Utc::now());
        if !due_now && out.busy.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn attempt(out: &Outbox, item: OutboxItem) {
    let (max, first) = notify::policy(out, item.kind);
    let n = item.attempts + 1;
    match notify::deliver(out, &item).await {
        Ok(()) => {
            let _ = out.control.outbox_done(item.id, n, "delivered").await;
            if item.kind == OutboxKind::Callback {
                let _ = out
                    .control
                    .set_callback(&item.run_id, &format!("delivered (attempt {n})"))
                    .await;
            }
        }
        Err(e) if n >= max => {
            let outcome = format!("failed after {n} attempts: {e}");
            notify::gave_up(&item, item.url.as_deref(), &e);
            let _ = out.control.outbox_done(item.id, n, &outcome).await;
            if item.kind == OutboxKind::Callback {
                let _ = out.control.set_callback(&item.run_id, &outcome).await;
            }
        }
        Err(e) => {
            let backoff = first
                .checked_mul(2u32.saturating_pow(n - 1))
                .unwrap_or(MAX_BACKOFF)
                .min(MAX_BACKOFF);
            let next = Utc::now() + chrono::Duration::from_std(backoff).unwrap_or_default();
            let _ = out.control.outbox_retry(item.id, n, next, &e).await;
            if item.kind == OutboxKind::Callback {
                let _ = out
                    .control
                    .set_callback(&item.run_id, &format!("retrying (attempt {n}: {e})"))
                    .await;
            }
        }
    }
}
