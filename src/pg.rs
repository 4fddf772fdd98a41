//! PostgreSQL client helpers shared by the sql checks ([`crate::checks`]), the personal data
//! gate ([`crate::privacy`]) and the local provider's restore: one way to connect to a copy
//! and one way to word the server's errors.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

/// How long a connection to a copy may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `url` (no TLS: copies listen on loopback or in the run's VPC) within
/// [`CONNECT_TIMEOUT`]; the connection's task runs until the client is dropped.
///
/// # Errors
/// The timeout, or the server's refusal in [`error`]'s words.
pub async fn connect(url: &str) -> Result<Client, String> {
    let (client, conn) = tokio::time::timeout(CONNECT_TIMEOUT, tokio_postgres::connect(url, NoTls))
        .await
        .map_err(|_| "connecting to the database timed out".to_string())?
        .map_err(|e| format!("connect: {}", error(&e)))?;
    tokio::spawn(conn);
    Ok(client)
}

/// The server's own words for an error (`ERROR: null value in column …`), else the client's.
#[must_use]
pub fn error(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map_or_else(
        || e.to_string(),
        |d| format!("{}: {}", d.severity(), d.message()),
    )
}
