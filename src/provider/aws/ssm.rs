//! Commands on the service's instance through SSM Run Command (`AWS-RunShellScript`):
//! SendCommand, then GetCommandInvocation until the invocation ends. This is how checks and the
//! install/health wait reach a copy whose addresses are private.
//!
//! The instance needs the SSM agent (Amazon Linux and Ubuntu AMIs have it) and an instance
//! profile with `AmazonSSMManagedInstanceCore`; docs/providers/aws.md has the details. An
//! emulator such as moto accepts the command and reports `Success` with exit code 0 and empty
//! output without running anything.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::clients::Clients;
use super::names::{sdk_code, sdk_message};
use super::wait::{self, Pace, Poll};
use crate::provider::ProviderError;

/// The shortest execution timeout SSM accepts; a shorter limit is raised to it.
pub const MIN_EXECUTION: Duration = Duration::from_secs(30);

/// How long after a script's execution timeout SSM may take to report the invocation's end.
const REPORT_GRACE: Duration = Duration::from_secs(30);

/// How an invocation ended.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// Command id.
    pub command_id: String,
    /// `Success`, `Failed`, `TimedOut`, `Cancelled`, ...
    pub status: String,
    /// The script's exit code (`ResponseCode`); -1 when it did not run.
    pub exit_code: i32,
    /// Standard output (SSM keeps the first 24,000 characters).
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Invocation {
    /// `SSM command ID on INSTANCE`, for reports.
    #[must_use]
    pub fn via(&self, instance: &str) -> String {
        format!("SSM command {} on {instance}", self.command_id)
    }
}

/// Runs `script` with `sh` on `instance` and waits for it to end. The script may run `max`
/// (at least [`MIN_EXECUTION`]), after which SSM stops it and reports `TimedOut`; the wait for
/// that answer allows [`REPORT_GRACE`] more. A SendCommand refused because the agent has not
/// registered yet is retried within `max`.
///
/// # Errors
/// API errors, [`ProviderError::Timeout`], [`ProviderError::Cancelled`].
pub async fn run(
    c: &Clients,
    instance: &str,
    comment: &str,
    script: &str,
    max: Duration,
    cancel: &CancellationToken,
) -> Result<Invocation, ProviderError> {
    let exec_secs = max.max(MIN_EXECUTION).as_secs();
    let comment: String = comment.chars().take(100).collect();
    let command_id = wait::until(
        &format!("the SSM agent on {instance} to accept a command"),
        max,
        Pace::FAST,
        Some(cancel),
        || async {
            match c
                .ssm
                .send_command()
                .instance_ids(instance)
                .document_name("AWS-RunShellScript")
                .comment(&comment)
                .timeout_seconds(i32::try_from(exec_secs).unwrap_or(i32::MAX))
                .parameters("commands", vec![script.to_string()])
                .parameters("executionTimeout", vec![exec_secs.to_string()])
                .send()
                .await
            {
                Ok(out) => Ok(Poll::Done(
                    out.command()
                        .and_then(|c| c.command_id())
                        .unwrap_or_default()
                        .to_string(),
                )),
                Err(e) if sdk_code(&e) == Some("InvalidInstanceId") => Ok(Poll::Pending(format!(
                    "not registered with SSM ({})",
                    sdk_message(&e)
                ))),
                Err(e) => Err(ProviderError::Other(format!(
                    "send an SSM command to {instance}: {}",
                    sdk_message(&e)
                ))),
            }
        },
    )
    .await?;
    wait::until(
        &format!("SSM command {command_id} on {instance} to finish"),
        Duration::from_secs(exec_secs) + REPORT_GRACE,
        Pace::FAST,
        Some(cancel),
        || async {
            match c
                .ssm
                .get_command_invocation()
                .command_id(&command_id)
                .instance_id(instance)
                .send()
                .await
            {
                Ok(out) => {
                    let status = out
                        .status()
                        .map_or_else(|| "Pending".to_string(), |s| s.as_str().to_string());
                    if matches!(
                        status.as_str(),
                        "Pending" | "InProgress" | "Delayed" | "Cancelling"
                    ) {
                        return Ok(Poll::Pending(status));
                    }
                    Ok(Poll::Done(Invocation {
                        command_id: command_id.clone(),
                        status,
                        exit_code: out.response_code(),
                        stdout: out
                            .standard_output_content()
                            .unwrap_or_default()
                            .to_string(),
                        stderr: out.standard_error_content().unwrap_or_default().to_string(),
                    }))
                }
                Err(e) if sdk_code(&e) == Some("InvocationDoesNotExist") => {
                    Ok(Poll::Pending("not delivered yet".into()))
                }
                Err(e) => Err(ProviderError::Other(format!(
                    "read SSM command {command_id} on {instance}: {}",
                    sdk_message(&e)
                ))),
            }
        },
    )
    .await
}

/// Quotes a string for `sh` (single quotes).
#[must_use]
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(super::quote("it's"), r"'it'\''s'");
    }
}
