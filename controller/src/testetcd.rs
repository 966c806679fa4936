//! Test helper: real `etcd` members on loopback ports, each in a temp
//! data dir, for the store's etcd backend and the controller-set tests.
//! The Debian package `etcd-server` provides `etcd`; it is installed here
//! when missing (as `.ci/run` does). Every member is killed on drop, and
//! dies with the test's thread if that ends first.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One member.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// An etcd cluster of one or more members.
pub struct Etcd {
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

/// The `etcd` binary, installed from Debian's `etcd-server` if missing.
pub fn binary() -> PathBuf {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let found = || {
        ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(p) = found() {
        return p;
    }
    let _ = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "etcd-server",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    found().expect("etcd is not installed and `apt-get install etcd-server` failed")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Etcd {
    /// Starts a cluster of `n` members and waits until it serves.
    pub fn start(n: usize) -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let mut etcd = Etcd { dir, members };
        for i in 0..n {
            etcd.spawn(i, true);
        }
        etcd.wait_healthy(Duration::from_secs(30));
        etcd
    }

    fn spawn(&mut self, i: usize, new: bool) {
        let cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", m.name)))
            .expect("etcd log file");
        let client = format!("http://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        // setpriv: etcd is killed if the thread that started it ends (the
        // test, even by kill -9), so no member outlives its test. Start
        // members from the test's own thread, not a pool's.
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"]).arg(binary());
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &cluster])
            .args([
                "--initial-cluster-state",
                if new { "new" } else { "existing" },
            ])
            .args(["--initial-cluster-token", "modi-test"])
            // What docs/operations.md asks of a production etcd too.
            .args(["--max-request-bytes", "16777216"])
            // Quicker elections than the defaults (100 ms / 1 s), as on
            // one loaded test machine.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log);
        self.members[i].child = Some(cmd.spawn().expect("etcd starts"));
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// The PID of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Kills member `i` (SIGKILL) and waits for it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data dir.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i, false);
    }

    /// Whether member `i` answers `/health` with `"health":"true"`.
    pub fn healthy(&self, i: usize) -> bool {
        let Ok(mut tcp) = std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], self.members[i].client).into(),
            Duration::from_millis(500),
        ) else {
            return false;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
        let asked =
            tcp.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        let mut answer = String::new();
        asked.is_ok()
            && tcp.read_to_string(&mut answer).is_ok()
            && answer.contains("\"health\":\"true\"")
    }

    /// Waits until every running member is healthy (a quorum serves).
    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let all = (0..self.members.len())
                .filter(|&i| self.members[i].child.is_some())
                .all(|i| self.healthy(i));
            if all {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy within {within:?}; its logs are in {}",
                self.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
