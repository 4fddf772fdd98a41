//! Waits with a deadline. Every wait names what it waits for and, when it gives up, the last
//! state it saw: `rds instance dryrun-… to become available did not finish within 40m: last
//! state backing-up`.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::provider::ProviderError;

/// One look at the resource.
#[derive(Debug)]
pub enum Poll<T> {
    /// Reached the wanted state.
    Done(T),
    /// Not yet; the state seen.
    Pending(String),
}

/// How often to look: first at once, then after `first`, doubling up to `cap`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// First pause.
    pub first: Duration,
    /// Longest pause.
    pub cap: Duration,
}

impl Pace {
    /// EC2 instances and SSM commands: seconds to minutes.
    pub const FAST: Pace = Pace {
        first: Duration::from_millis(25),
        cap: Duration::from_secs(5),
    };
    /// RDS: minutes to an hour.
    pub const SLOW: Pace = Pace {
        first: Duration::from_millis(25),
        cap: Duration::from_secs(15),
    };
}

/// Polls `look` until it returns [`Poll::Done`], the deadline `max` passes
/// ([`ProviderError::Timeout`] with the last state) or `cancel` fires
/// ([`ProviderError::Cancelled`]). Errors from `look` end the wait.
///
/// # Errors
/// As above.
pub async fn until<T, F, Fut>(
    what: &str,
    max: Duration,
    pace: Pace,
    cancel: Option<&CancellationToken>,
    mut look: F,
) -> Result<T, ProviderError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll<T>, ProviderError>>,
{
    let start = Instant::now();
    let mut pause = pace.first;
    let mut last = "not seen yet".to_string();
    loop {
        match look().await? {
            Poll::Done(v) => return Ok(v),
            Poll::Pending(state) => {
                if state != last {
                    tracing::debug!(what, state = %state, "waiting");
                }
                last = state;
            }
        }
        let elapsed = start.elapsed();
        if elapsed >= max {
            return Err(ProviderError::Timeout {
                what: what.to_string(),
                waited: max,
                last_state: last,
            });
        }
        let nap = pause.min(max - elapsed);
        match cancel {
            Some(c) => tokio::select! {
                () = tokio::time::sleep(nap) => {}
                () = c.cancelled() => return Err(ProviderError::Cancelled),
            },
            None => tokio::time::sleep(nap).await,
        }
        pause = (pause * 2).min(pace.cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn timeout_names_the_resource_and_its_last_state() {
        let e = until::<(), _, _>(
            "rds instance dryrun-x-db to become available",
            Duration::from_secs(60),
            Pace::SLOW,
            None,
            || async { Ok(Poll::Pending("backing-up".into())) },
        )
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "rds instance dryrun-x-db to become available did not finish within 1m: last state backing-up"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn done_returns_the_value() {
        let mut n = 0;
        let v = until("x", Duration::from_secs(5), Pace::FAST, None, || {
            n += 1;
            let done = n >= 3;
            async move {
                Ok(if done {
                    Poll::Done(7)
                } else {
                    Poll::Pending("pending".into())
                })
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 7);
    }
}
