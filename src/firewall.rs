//! The egress firewall of the local provider: the release's processes (install steps and
//! services) run in a network namespace of the run's own, which has nothing but a loopback
//! interface, so they cannot connect anywhere dryrun did not open a door for.
//!
//! The doors are TCP relays dryrun runs between the namespace and this machine's loopback:
//! - in: a service's port (`127.0.0.1:PORT` here → the same port in the namespace), so that
//!   health checks and checks reach it as before;
//! - out: what the release is meant to reach — the run's PostgreSQL copies, the side-effect
//!   sinks ([`crate::sinks`]) and the blueprint's `firewall.allow` entries (listened on at the
//!   same address inside the namespace, connected to from here).
//!
//! Blocked attempts are recorded: a TUN interface with no reader carries the namespace's
//! default routes, and an nftables rule on the output hook adds each destination to a set and
//! refuses the connection at once (TCP reset, ICMP for UDP) — nothing ever leaves the
//! namespace. `nft` missing means the namespace still enforces (no route: connections fail
//! with "network unreachable") but attempts are not recorded; the report says which.
//!
//! Creating a namespace needs root (or CAP_SYS_ADMIN). Where it cannot be created the
//! blueprint's `firewall` mode decides: `auto` (the default) goes on and reports the copy as
//! not firewalled, `required` stops the run. Processes enter the namespace through `nsenter`
//! (util-linux), naming it by dryrun's own descriptor, so that no unsafe `pre_exec` is needed.
//! The namespace lives as long as dryrun holds its descriptor or a process runs in it: a crash
//! leaks nothing.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The blueprint's `firewall.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Enforce where the machine allows it; otherwise run and say so in the report.
    #[default]
    Auto,
    /// Enforce, or stop the run (exit 3).
    Required,
    /// Do not confine the release.
    Off,
}

/// The blueprint's `firewall:` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Policy {
    /// Mode.
    pub mode: Mode,
    /// `host:port` entries the release may reach besides the run's own copies and sinks.
    pub allow: Vec<String>,
}

/// report.json `firewall`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallReport {
    /// The blueprint's mode.
    pub mode: Mode,
    /// Whether the release's processes were confined.
    pub enforced: bool,
    /// How, or why not.
    pub how: String,
    /// Where they may connect (`address:port`).
    #[serde(default)]
    pub allowed: Vec<String>,
}

const RULES: &str = r#"table inet dryrun {
  set b4 { type ipv4_addr . inet_service; flags dynamic; size 4096; }
  set b6 { type ipv6_addr . inet_service; flags dynamic; size 4096; }
  chain out {
    type filter hook output priority 0; policy accept;
    oifname "lo" accept
    meta nfproto ipv4 meta l4proto tcp add @b4 { ip daddr . tcp dport }
    meta nfproto ipv4 meta l4proto udp add @b4 { ip daddr . udp dport }
    meta nfproto ipv6 meta l4proto tcp add @b6 { ip6 daddr . tcp dport }
    meta nfproto ipv6 meta l4proto udp add @b6 { ip6 daddr . udp dport }
    meta l4proto tcp reject with tcp reset
    reject
  }
}
"#;

/// A system tool in the usual places (dryrun's own PATH may be minimal).
fn tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}

fn run_tool(name: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let path = tool(name).ok_or_else(|| format!("`{name}` not found"))?;
    let mut c = Command::new(&path);
    c.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| format!("{name}: {e}"))?;
    if let (Some(text), Some(mut i)) = (stdin, child.stdin.take()) {
        use std::io::Write as _;
        i.write_all(text.as_bytes())
            .map_err(|e| format!("{name}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{name}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{name} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs `f` on a fresh thread that has entered the namespace `ns` (the thread ends with it, so
/// no runtime thread ever changes namespace).
fn in_ns<T: Send + 'static>(
    ns: &File,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = ns.try_clone()?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        f()
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?
}

/// One run's network namespace and its relays.
pub struct Netns {
    ns: File,
    /// Why blocked attempts are not recorded, if they are not.
    not_recorded: Option<String>,
    relays: Mutex<JoinSet<()>>,
    allowed: Mutex<Vec<String>>,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns")
            .field("fd", &self.ns.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl Netns {
    /// Creates the namespace: loopback up, the recording route and rules where `nft` exists.
    ///
    /// # Errors
    /// Why it cannot be created (not root, no `ip`).
    pub fn create() -> Result<Netns, String> {
        let made = std::thread::spawn(|| -> Result<(File, Option<String>), String> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|e| {
                format!("cannot create a network namespace ({e}); it needs root or CAP_SYS_ADMIN")
            })?;
            let ns = File::open("/proc/thread-self/ns/net")
                .map_err(|e| format!("open the namespace: {e}"))?;
            // Children of this thread start in the new namespace.
            run_tool("ip", &["link", "set", "lo", "up"], None)?;
            let recorded = (|| {
                run_tool("nft", &["-f", "-"], Some(RULES))?;
                run_tool("ip", &["tuntap", "add", "dryrun0", "mode", "tun"], None)?;
                run_tool("ip", &["link", "set", "dryrun0", "up"], None)?;
                run_tool("ip", &["route", "add", "default", "dev", "dryrun0"], None)?;
                let _ = run_tool(
                    "ip",
                    &["-6", "route", "add", "default", "dev", "dryrun0"],
                    None,
                );
                Ok::<(), String>(())
            })();
            let not_recorded = recorded.err().map(|e| {
                // Without the rules, a route would swallow packets and connections would hang.
                let _ = run_tool("ip", &["route", "del", "default"], None);
                let _ = run_tool("ip", &["-6", "route", "del", "default"], None);
                format!("blocked attempts are not recorded: {e} (Debian: apt-get install nftables)")
            });
            Ok((ns, not_recorded))
        })
        .join()
        .map_err(|_| "namespace thread panicked".to_string())??;
        Ok(Netns {
            ns: made.0,
            not_recorded: made.1,
            relays: Mutex::new(JoinSet::new()),
            allowed: Mutex::new(Vec::new()),
        })
    }

    /// The `nsenter` arguments that run a command in the namespace:
    /// `nsenter --net=/proc/PID/fd/N --`.
    #[must_use]
    pub fn nsenter(&self) -> (PathBuf, Vec<String>) {
        (
            tool("nsenter").unwrap_or_else(|| PathBuf::from("nsenter")),
            vec![
                format!(
                    "--net=/proc/{}/fd/{}",
                    std::process::id(),
                    self.ns.as_raw_fd()
                ),
                "--".into(),
            ],
        )
    }

    /// How the namespace confines, for the report.
    #[must_use]
    pub fn how(&self) -> String {
        let base = "network namespace with loopback only; relays to the allowed addresses";
        match &self.not_recorded {
            None => format!("{base}; blocked attempts recorded (nftables)"),
            Some(why) => format!("{base}; {why}"),
        }
    }

    /// Allowed destinations so far.
    #[must_use]
    pub fn allowed(&self) -> Vec<String> {
        self.allowed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.relays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .spawn(task);
    }

    /// Relays `127.0.0.1:port` on this machine to the same port in the namespace (a service).
    ///
    /// # Errors
    /// When the port cannot be bound here.
    pub async fn relay_in(&self, port: u16) -> io::Result<()> {
        let l = TcpListener::bind(("127.0.0.1", port)).await?;
        let ns = self.ns.try_clone()?;
        self.spawn(async move {
            loop {
                let Ok((mut outside, _)) = l.accept().await else {
                    continue;
                };
                let Ok(ns) = ns.try_clone() else { continue };
                tokio::spawn(async move {
                    let to = SocketAddr::from(([127, 0, 0, 1], port));
                    if let Ok(mut inside) = connect_inside(ns, to).await {
                        let _ = tokio::io::copy_bidirectional(&mut outside, &mut inside).await;
                    }
                });
            }
        });
        Ok(())
    }

    /// Listens on `addr` inside the namespace and relays each connection to `addr` on this
    /// machine (a database copy, a sink, an allowed host). Idempotent per address.
    ///
    /// # Errors
    /// When `addr` cannot be bound inside the namespace.
    pub async fn relay_out(&self, addr: SocketAddr) -> io::Result<()> {
        let shown = addr.to_string();
        {
            let mut a = self
                .allowed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if a.contains(&shown) {
                return Ok(());
            }
            a.push(shown);
        }
        let ns = self.ns.try_clone()?;
        let listener = tokio::task::spawn_blocking(move || {
            in_ns(&ns, move || {
                if !addr.ip().is_loopback() {
                    // The address exists inside the namespace only, on its loopback.
                    let prefix = if addr.is_ipv4() { "32" } else { "128" };
                    run_tool(
                        "ip",
                        &[
                            "addr",
                            "add",
                            &format!("{}/{prefix}", addr.ip()),
                            "dev",
                            "lo",
                        ],
                        None,
                    )
                    .map_err(io::Error::other)?;
                }
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
        })
        .await
        .map_err(io::Error::other)??;
        let l = TcpListener::from_std(listener)?;
        self.spawn(async move {
            loop {
                let Ok((mut inside, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(Ok(mut outside)) =
                        tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
                            .await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inside, &mut outside).await;
                    }
                });
            }
        });
        Ok(())
    }

    /// Whether something listens on `port` inside the namespace (a service's readiness).
    pub async fn listening(&self, port: u16) -> bool {
        let Ok(ns) = self.ns.try_clone() else {
            return false;
        };
        connect_inside(ns, SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .is_ok()
    }

    /// The destinations the release tried and the firewall refused, `address:port`.
    #[must_use]
    pub fn blocked(&self) -> Vec<String> {
        if self.not_recorded.is_some() {
            return Vec::new();
        }
        let Ok(ns) = self.ns.try_clone() else {
            return Vec::new();
        };
        let listed = in_ns(&ns, || {
            let mut all = Vec::new();
            for set in ["b4", "b6"] {
                let json = run_tool("nft", &["-j", "list", "set", "inet", "dryrun", set], None)
                    .map_err(io::Error::other)?;
                all.extend(parse_set(&json));
            }
            Ok(all)
        });
        listed.unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.relays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .abort_all();
    }
}

async fn connect_inside(ns: File, to: SocketAddr) -> io::Result<TcpStream> {
    let s = tokio::task::spawn_blocking(move || {
        in_ns(&ns, move || {
            let s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
    })
    .await
    .map_err(io::Error::other)??;
    TcpStream::from_std(s)
}

/// `address:port` of each element of an `nft -j list set` answer.
fn parse_set(json: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let mut out = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        for e in item["set"]["elem"].as_array().into_iter().flatten() {
            // An element is {"concat": [addr, port]}, or {"elem": {"val": {"concat": …}}} with
            // timeouts or counters.
            let c = if e["concat"].is_array() {
                &e["concat"]
            } else {
                &e["elem"]["val"]["concat"]
            };
            if let (Some(a), Some(p)) = (c[0].as_str(), c[1].as_u64()) {
                out.push(if a.contains(':') {
                    format!("[{a}]:{p}")
                } else {
                    format!("{a}:{p}")
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_elements_are_read_as_addresses() {
        let json = r#"{"nftables": [{"metainfo": {}}, {"set": {"name": "b4", "elem": [{"concat": ["192.0.2.53", 53]}, {"elem": {"val": {"concat": ["2001:db8::1", 443]}, "timeout": 5}}]}}]}"#;
        assert_eq!(parse_set(json), vec!["192.0.2.53:53", "[2001:db8::1]:443"]);
        assert!(parse_set("not json").is_empty());
    }
}
