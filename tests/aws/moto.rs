//! The AWS emulator for the integration tests: moto server from the repository's `.venv/`
//! (scripts/test installs it), started on a free 127.0.0.1 port in its own process group and
//! killed with that group on drop, also when the test fails. Fixtures are made through the API;
//! the emulator's state is read back with describe/list calls and its request recorder.
//!
//! Credentials and the endpoint go only into the environment of the child `dryrun` processes
//! ([`Moto::env`]); this process's environment is never changed.
#![allow(dead_code)] // shared by tests/aws.rs and tests/aws_faults.rs, which use different parts

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};

/// The production master password of the fixture instance: must never appear anywhere.
pub const PROD_PASSWORD: &str = "Prod-Master-Pw-8f3a9c1d";
/// The secret access key dryrun is given: a canary that must never appear anywhere.
pub const SECRET_KEY: &str = "moto-secret-key-canary-3f9a2c71";
/// The production RDS instance.
pub const PROD_DB: &str = "shop-prod";
/// The production assets bucket.
pub const PROD_BUCKET: &str = "shop-prod-assets";
/// Bucket with release tarballs.
pub const RELEASES: &str = "shop-releases";
/// Manual snapshots of the production instance, oldest first.
pub const SNAPSHOTS: [&str; 3] = [
    "shop-prod-2026-11-19",
    "shop-prod-2026-11-20",
    "shop-prod-2026-11-21",
];
/// Region of every fixture.
pub const REGION: &str = "us-east-1";
/// The production Aurora PostgreSQL cluster ([`Moto::aurora_and_mysql`]).
pub const PROD_AURORA: &str = "shop-aurora";
/// The production MySQL instance ([`Moto::aurora_and_mysql`]).
pub const PROD_MYSQL: &str = "shop-mysql";

/// A running moto server and SDK clients pointed at it; with [`Moto::start_sim`], the instance
/// simulator (scripts/aws_sim.py) in front of it.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT` that dryrun talks to: moto, or the simulator in front of it.
    pub endpoint: String,
    /// moto itself (the test's own SDK clients and its control API).
    pub moto_endpoint: String,
    /// The simulator, when started with [`Moto::start_sim`].
    sim: Option<Child>,
    /// Where the simulator keeps its instances' files (and its log, `sim.log`).
    pub sim_dir: Option<PathBuf>,
    /// Runtime for the SDK calls of the test itself.
    pub rt: tokio::runtime::Runtime,
    /// Clients.
    pub rds: aws_sdk_rds::Client,
    /// S3.
    pub s3: aws_sdk_s3::Client,
    /// EC2.
    pub ec2: aws_sdk_ec2::Client,
    /// SSM.
    pub ssm: aws_sdk_ssm::Client,
    /// The emulator's AMI used for services.
    pub ami: String,
    _recording: tempfile::TempDir,
}

fn venv_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Moto {
    /// Starts moto, or returns `None` (printing why) when it is not installed. In CI (`CI`
    /// set) a missing moto fails the test instead.
    pub fn start() -> Option<Moto> {
        Self::start_with(false, &[])
    }

    /// moto with the instance simulator in front (scripts/aws_sim.py): user data and SSM
    /// commands run for real in a sandbox per instance. `None` (printing why) where it cannot
    /// run — not root, or `unshare`/`nsenter` missing; in CI that fails the test instead.
    pub fn start_sim() -> Option<Moto> {
        Self::sim_possible().then(|| Self::start_with(true, &[]))?
    }

    fn sim_possible() -> bool {
        let root = nix::unistd::geteuid().is_root();
        let tools = ["unshare", "nsenter", "ip", "setpriv", "python3", "curl"]
            .iter()
            .all(|t| which(t));
        if !root || !tools {
            assert!(
                std::env::var_os("CI").is_none(),
                "the AWS instance simulator needs root and unshare, nsenter, ip, setpriv, python3, curl in CI"
            );
            eprintln!("skipping: the AWS instance simulator needs root and util-linux/iproute2");
            return false;
        }
        true
    }

    /// [`Moto::start_sim`] at a cloud's pace: a restored RDS instance stays `creating` for
    /// `rds_delay` seconds, an instance boots (and accepts SSM commands) `boot_delay` seconds
    /// after RunInstances.
    pub fn start_sim_paced(rds_delay: u32, boot_delay: u32) -> Option<Moto> {
        let args = [
            "--rds-delay".to_string(),
            rds_delay.to_string(),
            "--boot-delay".into(),
            boot_delay.to_string(),
        ];
        Self::sim_possible().then(|| Self::start_with(true, &args))?
    }

    fn start_with(sim: bool, sim_args: &[String]) -> Option<Moto> {
        let bin = venv_bin();
        if !bin.is_file() {
            assert!(
                std::env::var_os("CI").is_none(),
                "{} is missing in CI: scripts/test must install moto[server] into .venv",
                bin.display()
            );
            eprintln!(
                "skipping: moto is not installed (run scripts/test, which installs it into .venv/)"
            );
            return None;
        }
        let recording = tempfile::tempdir().unwrap();
        let (child, port) = spawn_moto(&bin, &recording.path().join("rec.jsonl"));
        let endpoint = format!("http://127.0.0.1:{port}");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let creds = Credentials::new("testing", "testing", None, None, "dryrun-tests");
        let rds = aws_sdk_rds::Client::from_conf(
            aws_sdk_rds::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(REGION))
                .endpoint_url(&endpoint)
                .credentials_provider(creds.clone())
                .build(),
        );
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(REGION))
                .endpoint_url(&endpoint)
                .force_path_style(true)
                .credentials_provider(creds.clone())
                .build(),
        );
        let ec2 = aws_sdk_ec2::Client::from_conf(
            aws_sdk_ec2::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(REGION))
                .endpoint_url(&endpoint)
                .credentials_provider(creds.clone())
                .build(),
        );
        let ssm = aws_sdk_ssm::Client::from_conf(
            aws_sdk_ssm::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(REGION))
                .endpoint_url(&endpoint)
                .credentials_provider(creds)
                .build(),
        );
        let mut m = Moto {
            child,
            moto_endpoint: endpoint.clone(),
            endpoint,
            sim: None,
            sim_dir: None,
            rt,
            rds,
            s3,
            ec2,
            ssm,
            ami: String::new(),
            _recording: recording,
        };
        m.fixtures();
        if sim {
            m.start_simulator(sim_args);
        }
        // Record only what the tests' runs ask, not the fixtures.
        m.http("POST", "/moto-api/recorder/reset-recording");
        m.http("POST", "/moto-api/recorder/start-recording");
        Some(m)
    }

    fn start_simulator(&mut self, extra: &[String]) {
        let dir = self._recording.path().join("sim");
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("sim.log")).unwrap();
        let child = Command::new("python3")
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/aws_sim.py"))
            .args([
                "--upstream",
                &self.moto_endpoint,
                "--port",
                &port.to_string(),
                "--dir",
            ])
            .arg(&dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start scripts/aws_sim.py");
        self.sim = Some(child);
        self.sim_dir = Some(dir.clone());
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = self.sim.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the simulator exited at start ({status}):\n{}",
                    std::fs::read_to_string(dir.join("sim.log")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the simulator did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.endpoint = format!("http://127.0.0.1:{port}");
    }

    /// The simulator's live sandboxes (instance ids); empty without the simulator.
    pub fn sandboxes(&self) -> Vec<String> {
        if self.sim.is_none() {
            return Vec::new();
        }
        let raw = http_get(&self.endpoint, "/__sim/instances");
        let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        v["instances"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| i["id"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The simulator's log (what it did), for failure messages.
    pub fn sim_log(&self) -> String {
        self.sim_dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.join("sim.log")).ok())
            .unwrap_or_default()
    }

    /// Puts a release tarball into the releases bucket; returns its `s3://` reference.
    pub fn put_release(&self, key: &str, tarball: Vec<u8>) -> String {
        self.rt.block_on(async {
            self.s3
                .put_object()
                .bucket(RELEASES)
                .key(key)
                .body(tarball.into())
                .send()
                .await
                .unwrap();
        });
        format!("s3://{RELEASES}/{key}")
    }

    /// A raw HTTP/1.0 request to the emulator (its control API); returns the whole response.
    pub fn http(&self, method: &str, path: &str) -> String {
        http_request(&self.moto_endpoint, method, path)
    }
}

/// Starts moto_server on a free port and waits until moto itself answers there. The port is
/// free when chosen but not reserved: another test's server (a run's HTTP sink, say) may take
/// it first. Then moto cannot bind and exits, or a foreign server answers: another port is
/// tried.
fn spawn_moto(bin: &std::path::Path, recording: &std::path::Path) -> (std::process::Child, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("MOTO_ENABLE_RECORDING", "True")
            .env("MOTO_RECORDER_FILEPATH", recording)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start moto_server");
        let endpoint = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            let answer = http_get(&endpoint, "/moto-api/");
            if answer.contains("<title>Moto") {
                return (child, port);
            }
            if answer.starts_with("HTTP/1") {
                // Someone else's server holds the port; ours cannot have bound it.
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("moto_server did not answer on port {port} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("moto_server could not get a free port in 5 tries");
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn http_get(endpoint: &str, path: &str) -> String {
    http_request(endpoint, "GET", path)
}

fn http_request(endpoint: &str, method: &str, path: &str) -> String {
    {
        use std::io::{Read, Write};
        let addr = endpoint.trim_start_matches("http://");
        let Ok(mut s) = TcpStream::connect(addr) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"
        );
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Moto {
    /// The environment a child `dryrun` needs to talk to this emulator, and nothing else.
    pub fn env(&self, cmd: &mut Command) {
        cmd.envs(self.env_pairs())
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN");
    }

    /// The variables of [`Moto::env`], for a process started elsewhere (a test server).
    pub fn env_pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
            (
                "AWS_CONFIG_FILE",
                "/nonexistent/dryrun-tests/config".to_string(),
            ),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/dryrun-tests/credentials".to_string(),
            ),
        ]
    }

    fn fixtures(&mut self) {
        let rt = &self.rt;
        rt.block_on(async {
            self.rds
                .create_db_instance()
                .db_instance_identifier(PROD_DB)
                .engine("postgres")
                .db_instance_class("db.t3.micro")
                .master_username("shop")
                .master_user_password(PROD_PASSWORD)
                .allocated_storage(20)
                .tags(
                    aws_sdk_rds::types::Tag::builder()
                        .key("env")
                        .value("production")
                        .build(),
                )
                .send()
                .await
                .unwrap();
            for s in SNAPSHOTS {
                self.rds
                    .create_db_snapshot()
                    .db_instance_identifier(PROD_DB)
                    .db_snapshot_identifier(s)
                    .send()
                    .await
                    .unwrap();
                // Distinct creation times, so "latest" is well defined.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.s3
                .create_bucket()
                .bucket(PROD_BUCKET)
                .send()
                .await
                .unwrap();
            for (k, v) in prod_objects() {
                self.s3
                    .put_object()
                    .bucket(PROD_BUCKET)
                    .key(k)
                    .body(v.into_bytes().into())
                    .send()
                    .await
                    .unwrap();
            }
            self.s3
                .create_bucket()
                .bucket(RELEASES)
                .send()
                .await
                .unwrap();
            self.s3
                .put_object()
                .bucket(RELEASES)
                .key("shop-2.0.0.tar.gz")
                .body(release_tarball("2.0.0").into())
                .send()
                .await
                .unwrap();
            let images = self
                .ec2
                .describe_images()
                .owners("amazon")
                .send()
                .await
                .unwrap();
            self.ami = images.images()[0].image_id().unwrap().to_string();
        });
    }

    /// More production: an Aurora PostgreSQL cluster [`PROD_AURORA`] with deletion protection
    /// and one writer, and a MySQL instance [`PROD_MYSQL`] with a snapshot.
    pub fn aurora_and_mysql(&self) {
        let prod = aws_sdk_rds::types::Tag::builder()
            .key("env")
            .value("production")
            .build();
        self.rt.block_on(async {
            self.rds
                .create_db_cluster()
                .db_cluster_identifier(PROD_AURORA)
                .engine("aurora-postgresql")
                .master_username("shop")
                .master_user_password(PROD_PASSWORD)
                .deletion_protection(true)
                .tags(prod.clone())
                .send()
                .await
                .unwrap();
            self.rds
                .create_db_instance()
                .db_instance_identifier(format!("{PROD_AURORA}-1"))
                .db_cluster_identifier(PROD_AURORA)
                .engine("aurora-postgresql")
                .db_instance_class("db.r6g.large")
                .tags(prod.clone())
                .send()
                .await
                .unwrap();
            self.rds
                .create_db_instance()
                .db_instance_identifier(PROD_MYSQL)
                .engine("mysql")
                .db_instance_class("db.t3.micro")
                .master_username("shop")
                .master_user_password(PROD_PASSWORD)
                .allocated_storage(20)
                .tags(prod)
                .send()
                .await
                .unwrap();
            self.rds
                .create_db_snapshot()
                .db_instance_identifier(PROD_MYSQL)
                .db_snapshot_identifier("shop-mysql-nightly")
                .send()
                .await
                .unwrap();
        });
        // Record only what the tests' runs ask, not these fixtures.
        self.http("POST", "/moto-api/recorder/reset-recording");
        self.http("POST", "/moto-api/recorder/start-recording");
    }

    /// What the production Aurora cluster looks like (status, protection, members, tags).
    pub fn aurora_production(&self) -> String {
        self.rt.block_on(async {
            let c = self
                .rds
                .describe_db_clusters()
                .db_cluster_identifier(PROD_AURORA)
                .send()
                .await
                .unwrap();
            let c = &c.db_clusters()[0];
            format!(
                "{} {} protected={:?} members={:?} tags={:?}",
                c.db_cluster_identifier().unwrap_or(""),
                c.status().unwrap_or(""),
                c.deletion_protection(),
                c.db_cluster_members()
                    .iter()
                    .map(|m| m.db_instance_identifier().unwrap_or(""))
                    .collect::<Vec<_>>(),
                c.tag_list()
                    .iter()
                    .map(|t| (t.key().unwrap_or(""), t.value().unwrap_or("")))
                    .collect::<Vec<_>>(),
            )
        })
    }

    /// Everything live in the emulator that carries a `dryrun:run-id` tag (of `run_id`, or of
    /// any run): `kind id` strings. Terminated instances do not count (they are gone on AWS
    /// too, only still listed for a while).
    pub fn tagged(&self, run_id: Option<&str>) -> Vec<String> {
        let matches = |tags: &[(String, String)]| {
            tags.iter()
                .any(|(k, v)| k == "dryrun:run-id" && run_id.is_none_or(|r| r == v))
        };
        self.rt.block_on(async {
            let mut out = Vec::new();
            let ins = self.ec2.describe_instances().send().await.unwrap();
            for i in ins.reservations().iter().flat_map(|r| r.instances()) {
                let state = i
                    .state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string());
                if state.as_deref() == Some("terminated") {
                    continue;
                }
                let tags: Vec<(String, String)> = i
                    .tags()
                    .iter()
                    .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
                    .collect();
                if matches(&tags) {
                    out.push(format!("instance {}", i.instance_id().unwrap()));
                }
            }
            let dbs = self.rds.describe_db_instances().send().await.unwrap();
            for d in dbs.db_instances() {
                let tags: Vec<(String, String)> = d
                    .tag_list()
                    .iter()
                    .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
                    .collect();
                if matches(&tags) {
                    out.push(format!("rds {}", d.db_instance_identifier().unwrap()));
                }
            }
            let clusters = self.rds.describe_db_clusters().send().await.unwrap();
            for d in clusters.db_clusters() {
                let tags: Vec<(String, String)> = d
                    .tag_list()
                    .iter()
                    .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
                    .collect();
                if matches(&tags) {
                    out.push(format!("cluster {}", d.db_cluster_identifier().unwrap()));
                }
            }
            let sgs = self.ec2.describe_security_groups().send().await.unwrap();
            for g in sgs.security_groups() {
                let tags: Vec<(String, String)> = g
                    .tags()
                    .iter()
                    .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
                    .collect();
                if matches(&tags) {
                    out.push(format!("sg {}", g.group_id().unwrap()));
                }
            }
            for b in self.s3.list_buckets().send().await.unwrap().buckets() {
                let name = b.name().unwrap();
                let tags: Vec<(String, String)> =
                    match self.s3.get_bucket_tagging().bucket(name).send().await {
                        Ok(t) => t
                            .tag_set()
                            .iter()
                            .map(|t| (t.key().to_string(), t.value().to_string()))
                            .collect(),
                        Err(_) => Vec::new(),
                    };
                if matches(&tags) {
                    out.push(format!("bucket {name}"));
                }
            }
            out
        })
    }

    /// What production looks like: the instance (status, class, tags), its snapshots, the
    /// bucket's objects with sizes. Compared before and after a run.
    pub fn production(&self) -> String {
        self.rt.block_on(async {
            let d = self
                .rds
                .describe_db_instances()
                .db_instance_identifier(PROD_DB)
                .send()
                .await
                .unwrap();
            let d = &d.db_instances()[0];
            let snaps = self
                .rds
                .describe_db_snapshots()
                .db_instance_identifier(PROD_DB)
                .send()
                .await
                .unwrap();
            let mut snap_ids: Vec<String> = snaps
                .db_snapshots()
                .iter()
                .map(|s| {
                    format!(
                        "{}:{}",
                        s.db_snapshot_identifier().unwrap(),
                        s.status().unwrap_or("")
                    )
                })
                .collect();
            snap_ids.sort();
            let objs = self
                .s3
                .list_objects_v2()
                .bucket(PROD_BUCKET)
                .send()
                .await
                .unwrap();
            let objects: Vec<String> = objs
                .contents()
                .iter()
                .map(|o| format!("{}={}", o.key().unwrap(), o.size().unwrap_or(0)))
                .collect();
            format!(
                "db {} {} {} sgs={:?} tags={:?}\nsnapshots {snap_ids:?}\nobjects {objects:?}",
                d.db_instance_identifier().unwrap(),
                d.db_instance_status().unwrap_or(""),
                d.db_instance_class().unwrap_or(""),
                d.vpc_security_groups()
                    .iter()
                    .map(|g| g.vpc_security_group_id().unwrap_or(""))
                    .collect::<Vec<_>>(),
                d.tag_list()
                    .iter()
                    .map(|t| (t.key().unwrap_or(""), t.value().unwrap_or("")))
                    .collect::<Vec<_>>(),
            )
        })
    }

    /// Every request the emulator received since it started: (operation, parameters).
    pub fn requests(&self) -> Vec<Request> {
        let raw = self.http("GET", "/moto-api/recorder/download-recording");
        let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        body.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| Request::from_recording(&v))
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        // The simulator first: SIGTERM ends its sandboxes; its process group (and the sandboxes'
        // parent-death signal) covers a simulator that does not answer.
        if let Some(mut sim) = self.sim.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(sim.id()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while sim.try_wait().ok().flatten().is_none()
                && start.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = sim.wait();
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// One recorded request.
#[derive(Debug, Clone)]
pub struct Request {
    /// `RunInstances`, `AmazonSSM.SendCommand`, or `METHOD /path` for S3.
    pub action: String,
    /// Query or form parameters, or the JSON body's top-level fields as text.
    pub params: BTreeMap<String, String>,
    /// The decoded body.
    pub body: String,
    /// The request path and query.
    pub url: String,
}

impl Request {
    fn from_recording(v: &serde_json::Value) -> Request {
        let raw = v["body"].as_str().unwrap_or("");
        let body = if v["body_encoded"].as_bool() == Some(true) {
            String::from_utf8_lossy(&base64_decode(raw)).into_owned()
        } else {
            raw.to_string()
        };
        let url = v["url"].as_str().unwrap_or("").to_string();
        let target = v["headers"]["X-Amz-Target"]
            .as_str()
            .map(ToString::to_string);
        let mut params = BTreeMap::new();
        if let Some(t) = &target {
            if let Ok(serde_json::Value::Object(m)) =
                serde_json::from_str::<serde_json::Value>(&body)
            {
                for (k, val) in m {
                    params.insert(k, val.to_string());
                }
            }
            return Request {
                action: t.clone(),
                params,
                body,
                url,
            };
        }
        let query = url.split_once('?').map_or("", |(_, q)| q);
        for pair in body.split('&').chain(query.split('&')) {
            if let Some((k, val)) = pair.split_once('=') {
                params.insert(url_decode(k), url_decode(val));
            }
        }
        let action = params.get("Action").cloned().unwrap_or_else(|| {
            let path = url.splitn(4, '/').nth(3).unwrap_or("");
            format!("{} /{path}", v["method"].as_str().unwrap_or("?"))
        });
        Request {
            action,
            params,
            body,
            url,
        }
    }
}

fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match h {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let Some(v) = val(c) else { continue };
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).unwrap());
        }
    }
    out
}

/// The production bucket's objects.
pub fn prod_objects() -> Vec<(&'static str, String)> {
    vec![
        ("img/SKU-1001.svg", "<svg>1001</svg>".into()),
        ("img/SKU-1002.svg", "<svg>1002</svg>".into()),
        ("img/a b+c.png", "x".repeat(300)),
        ("docs/terms.html", "<p>terms</p>".into()),
        ("robots.txt", "User-agent: *".into()),
    ]
}

/// A small blueprint like the reference one (a database, a bucket, a service), with the given
/// checks and the service's `ready_timeout`.
pub fn app_blueprint(dir: &std::path::Path, checks: &str, ready_timeout: &str) -> PathBuf {
    let p = dir.join("app.yaml");
    let text = [
        "name: app",
        "# The emulator's RDS copy has a private address the runner never connects to.",
        "pii_gate: off",
        "params:",
        "  source_db: {default: shop-prod}",
        "  assets_bucket: {default: shop-prod-assets}",
        "  ami: {default: \"\"}",
        "resources:",
        "  db:",
        "    type: database",
        "    engine: postgres",
        "    source: \"{{params.source_db}}\"",
        "    database: shop",
        "  assets:",
        "    type: bucket",
        "    source: \"{{params.assets_bucket}}\"",
        "    prefix: img/",
        "  app:",
        "    type: service",
        "    env:",
        "      DATABASE_URL: \"{{resources.db.url}}\"",
        "      APP_VERSION: \"{{release.version}}\"",
        &format!("    ready_timeout: {ready_timeout}"),
        "    aws:",
        "      ami: \"{{params.ami}}\"",
        "checks:",
    ]
    .join("\n");
    std::fs::write(&p, format!("{text}\n{checks}\nttl: 1h\n")).unwrap();
    p
}

/// The release's small web server (Python, standard library only): `/` is the shop's front
/// page, `/healthz` answers `ok` (500 with `--unhealthy`), `/api/stats` the version it was
/// started with (`APP_VERSION`); every request is logged on stderr.
pub const SERVER_PY: &str = r#"import http.server, json, os, sys
VERSION = os.environ.get("APP_VERSION", "unknown")
UNHEALTHY = "--unhealthy" in sys.argv
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz":
            code, ctype, body = (500, "text/plain", b"not ready") if UNHEALTHY else (200, "text/plain", b"ok")
        elif self.path == "/api/stats":
            code, ctype, body = 200, "application/json", json.dumps({"version": VERSION}).encode()
        elif self.path == "/":
            code, ctype, body = 200, "text/html", b"<h1>Demo Shop</h1>"
        else:
            code, ctype, body = 404, "text/plain", b"not found"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
print(f"shop {VERSION} listening on {os.environ['PORT']}", flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), H).serve_forever()
"#;

/// A release tarball with a manifest under one top-level directory: a migrate step and the
/// small web server ([`SERVER_PY`]) with a health check.
pub fn release_tarball(version: &str) -> Vec<u8> {
    release_tarball_with(
        version,
        "#!/bin/sh\necho \"migrated (database ${DATABASE_URL:+given})\"\n",
        "exec python3 ./bin/server.py",
    )
}

/// A release tarball with this `bin/migrate` script and this start command.
pub fn release_tarball_with(version: &str, migrate: &str, start: &str) -> Vec<u8> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join(format!("shop-{version}"));
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(
        root.join("dryrun-release.yaml"),
        format!(
            "version: \"{version}\"\ninstall:\n  - name: migrate\n    run: ./bin/migrate\nstart: {}\nhealth:\n  http: /healthz\n  timeout: 60s\n",
            serde_json::to_string(start).unwrap()
        ),
    )
    .unwrap();
    std::fs::write(root.join("bin/migrate"), migrate).unwrap();
    std::fs::set_permissions(
        root.join("bin/migrate"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(root.join("bin/server.py"), SERVER_PY).unwrap();
    let mut buf = Vec::new();
    {
        let enc = flate2::write::GzEncoder::new(&mut buf, flate2::Compression::fast());
        let mut b = tar::Builder::new(enc);
        b.append_dir_all(format!("shop-{version}"), &root).unwrap();
        b.into_inner().unwrap().finish().unwrap();
    }
    buf
}
