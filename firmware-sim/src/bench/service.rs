//! The `silverguard` processes the bench runs: the one-shot admin commands (`migrate`,
//! `device add`, `import`) and `serve` as a child whose CPU time and memory are read from
//! `/proc`, and whose HTTP endpoints (`/readyz`, `/metrics`) are read with a minimal HTTP/1.0
//! client (the bench needs two GETs; a client library would be all cost).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::stats::{parse_kib_field, parse_proc_stat_ticks};
use super::BenchError;

/// Largest HTTP answer read (the metrics page is a few KiB).
const MAX_RESPONSE: usize = 4 << 20;

/// One HTTP/1.0 request to a local address: `(status, body)`. HTTP/1.0, so the server answers
/// with a plain body and closes (no chunked encoding to decode).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    timeout: Duration,
) -> Result<(u16, String), std::io::Error> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
        if let Some((ctype, b)) = body {
            req.push_str(&format!(
                "Content-Type: {ctype}\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await?;
        if let Some((_, b)) = body {
            stream.write_all(b).await?;
        }
        let mut buf = Vec::new();
        stream
            .take(MAX_RESPONSE as u64)
            .read_to_end(&mut buf)
            .await?;
        parse_response(&buf).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response")
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP request timed out"))?
}

/// `HTTP/1.x 200 OK\r\n...\r\n\r\nbody` → `(200, body)`.
fn parse_response(buf: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status_line = head.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    let code: u16 = parts.next()?.parse().ok()?;
    Some((code, body.to_string()))
}

/// A free TCP port on 127.0.0.1 (bound, read, released: another process could take it in
/// between, which on a bench machine does not happen in practice).
pub fn free_port() -> Result<u16, BenchError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError::io("finding a free port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| BenchError::io("finding a free port", e))
}

/// Clock ticks per second for `/proc/<pid>/stat` (`getconf CLK_TCK`; 100 on every Linux the
/// bench is likely to meet, so that is the fallback).
pub fn clock_ticks_per_s() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// User + system CPU ticks of a process so far.
pub fn process_ticks(pid: u32) -> Option<u64> {
    parse_proc_stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Peak and current resident set of a process, KiB.
pub fn process_memory_kib(pid: u32) -> (Option<u64>, Option<u64>) {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(s) => (parse_kib_field(&s, "VmHWM"), parse_kib_field(&s, "VmRSS")),
        Err(_) => (None, None),
    }
}

/// How to run `silverguard`: the binary and the environment every invocation gets.
#[derive(Debug, Clone)]
pub struct ServiceCmd {
    pub bin: PathBuf,
    /// `SILVERGUARD_*` settings; every other `SILVERGUARD_*` variable of the bench's own
    /// environment is removed, so a developer's shell settings cannot leak into the run.
    pub env: Vec<(String, String)>,
}

impl ServiceCmd {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SILVERGUARD_") {
                c.env_remove(&k);
            }
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Runs an admin command to completion, with `stdin` fed to it; fails with its stderr.
    pub async fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String, BenchError> {
        let shown = format!("{} {}", self.bin.display(), args.join(" "));
        let mut child = self
            .command(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                BenchError::Service(format!(
                    "could not start `{shown}`: {e} (build it with `cargo build --release -p \
                     silverguard`, or pass --silverguard-bin)"
                ))
            })?;
        let write = match (stdin, child.stdin.take()) {
            (Some(data), Some(mut pipe)) => {
                let r = pipe.write_all(data).await;
                drop(pipe);
                r
            }
            _ => Ok(()),
        };
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| BenchError::io(&format!("waiting for `{shown}`"), e))?;
        if !out.status.success() {
            return Err(BenchError::Service(format!(
                "`{shown}` exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        write.map_err(|e| BenchError::io(&format!("feeding `{shown}`"), e))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The same command with some settings replaced (or added).
    pub fn with(&self, overrides: &[(&str, String)]) -> ServiceCmd {
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(k, _)| !overrides.iter().any(|(o, _)| o == k))
            .cloned()
            .collect();
        env.extend(overrides.iter().map(|(k, v)| (k.to_string(), v.clone())));
        ServiceCmd {
            bin: self.bin.clone(),
            env,
        }
    }

    /// Starts `silverguard serve` with stdout and stderr appended to `log`.
    pub async fn serve(&self, http: SocketAddr, log: &Path) -> Result<Service, BenchError> {
        if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| BenchError::io(&format!("creating {}", dir.display()), e))?;
        }
        let file = std::fs::File::create(log)
            .map_err(|e| BenchError::io(&format!("creating {}", log.display()), e))?;
        let err = file
            .try_clone()
            .map_err(|e| BenchError::io(&format!("opening {}", log.display()), e))?;
        let child = self
            .command(&["serve"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            // The bench must not leave a service behind, whatever happens to it.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                BenchError::Service(format!(
                    "could not start `{} serve`: {e}",
                    self.bin.display()
                ))
            })?;
        let pid = child.id().ok_or_else(|| {
            BenchError::Service("silverguard serve exited before it could be watched".into())
        })?;
        Ok(Service {
            child,
            pid,
            http,
            log: log.to_path_buf(),
        })
    }
}

/// A running `silverguard serve`.
pub struct Service {
    child: Child,
    pub pid: u32,
    pub http: SocketAddr,
    pub log: PathBuf,
}

impl Service {
    /// Waits until `/readyz` answers 200 (database reachable, every MQTT connection up).
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Duration, BenchError> {
        let start = Instant::now();
        let mut last = String::from("no answer yet");
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(BenchError::Service(format!(
                    "silverguard serve exited with {status} before it was ready (log: {})",
                    self.log.display()
                )));
            }
            match http_request(self.http, "GET", "/readyz", None, Duration::from_secs(3)).await {
                Ok((200, _)) => return Ok(start.elapsed()),
                Ok((code, body)) => last = format!("HTTP {code}: {}", body.trim()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(BenchError::Service(format!(
            "silverguard was not ready within {timeout:?} ({last}; log: {})",
            self.log.display()
        )))
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> Result<String, BenchError> {
        match http_request(self.http, "GET", "/metrics", None, Duration::from_secs(5)).await {
            Ok((200, body)) => Ok(body),
            Ok((code, _)) => Err(BenchError::Service(format!("/metrics answered {code}"))),
            Err(e) => Err(BenchError::io("reading /metrics", e)),
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM (graceful: drain, commit, ack), then SIGKILL if it has not exited in `grace`.
    pub async fn stop(mut self, grace: Duration) {
        // `kill -TERM` rather than an unsafe libc call: one process, once per run.
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("silverguard did not stop within {grace:?}; killing it");
                let _ = self.child.kill().await;
            }
        }
    }
}

/// The `silverguard serve` processes of one run: one, or several sharing the MQTT stream
/// through a shared subscription (`--instances`). Read together they look like one service:
/// their metrics pages are concatenated (counters and histograms then add up, see
/// [`super::stats::scalar`] and [`super::stats::Histogram::parse`]) and their CPU time and
/// memory are summed; each one's own figures are kept for the report.
pub struct Services {
    pub list: Vec<Service>,
}

impl Services {
    pub fn pids(&self) -> Vec<u32> {
        self.list.iter().map(|s| s.pid).collect()
    }

    /// Waits until every instance is ready; returns the longest wait.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Duration, BenchError> {
        let start = Instant::now();
        for s in &mut self.list {
            s.wait_ready(timeout.saturating_sub(start.elapsed()))
                .await?;
        }
        Ok(start.elapsed())
    }

    /// Every instance's `/metrics`, in instance order.
    pub async fn metrics_each(&self) -> Result<Vec<String>, BenchError> {
        let mut out = Vec::with_capacity(self.list.len());
        for s in &self.list {
            out.push(s.metrics().await?);
        }
        Ok(out)
    }

    /// All instances' `/metrics` pages, one after the other.
    pub async fn metrics(&self) -> Result<String, BenchError> {
        Ok(self.metrics_each().await?.join("\n"))
    }

    /// Whether every instance is still running.
    pub fn running(&mut self) -> bool {
        self.list.iter_mut().all(|s| s.running())
    }

    /// The log of each instance, comma-separated.
    pub fn logs(&self) -> String {
        let logs: Vec<String> = self
            .list
            .iter()
            .map(|s| s.log.display().to_string())
            .collect();
        logs.join(", ")
    }

    pub async fn stop(self, grace: Duration) {
        for s in self.list {
            s.stop(grace).await;
        }
    }
}

/// Every process on this machine whose command name (`/proc/<pid>/comm`) is `name`:
/// `mosquitto` for the broker, `postgres` for the whole PostgreSQL server (postmaster,
/// backends, WAL writer, checkpointer, autovacuum). Empty when none runs here (a remote
/// broker or database).
pub fn pids_by_command(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
        .collect()
}

/// User + system CPU ticks, summed, of every process named `name` ([`pids_by_command`]).
/// `None` when no such process runs here. A process that exits between two samples takes
/// its ticks with it, so short-lived backends are not counted.
pub fn ticks_by_command(name: &str) -> Option<u64> {
    pids_by_command(name)
        .into_iter()
        .filter_map(process_ticks)
        .reduce(|a, b| a + b)
}

/// The CPUs a process may run on (`Cpus_allowed_list` of `/proc/<pid>/status`, e.g. `0-1`).
pub fn cpus_allowed(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
}

/// The distinct CPU lists of every process named `name`, sorted (several when, say, two
/// brokers run here with different layouts).
pub fn cpus_allowed_by_command(name: &str) -> Vec<String> {
    let mut lists: Vec<String> = pids_by_command(name)
        .into_iter()
        .filter_map(cpus_allowed)
        .collect();
    lists.sort();
    lists.dedup();
    lists
}

/// User + system CPU ticks of several processes together (`None` when one cannot be read).
pub fn processes_ticks(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|p| process_ticks(*p)).sum()
}

/// Peak and current resident set of several processes, summed, KiB.
pub fn processes_memory_kib(pids: &[u32]) -> (Option<u64>, Option<u64>) {
    let each: Vec<(Option<u64>, Option<u64>)> =
        pids.iter().map(|p| process_memory_kib(*p)).collect();
    (
        each.iter().map(|m| m.0).sum(),
        each.iter().map(|m| m.1).sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_responses() {
        assert_eq!(
            parse_response(b"HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nok\n"),
            Some((200, "ok\n".to_string()))
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\n\r\n{}"),
            Some((503, "{}".to_string()))
        );
        assert_eq!(parse_response(b"garbage"), None);
        assert_eq!(parse_response(b"SMTP 200\r\n\r\n"), None);
    }

    #[test]
    fn this_process_can_be_watched() {
        let pid = std::process::id();
        assert!(process_ticks(pid).is_some());
        let (hwm, rss) = process_memory_kib(pid);
        assert!(hwm.unwrap_or(0) >= rss.unwrap_or(0) && rss.unwrap_or(0) > 0);
        assert!(clock_ticks_per_s() > 0);
    }

    #[test]
    fn processes_are_found_by_command_name() {
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        let own = process_ticks(std::process::id()).unwrap();
        assert!(ticks_by_command(comm.trim_end()).is_some_and(|t| t >= own));
        assert_eq!(ticks_by_command("no-such-command-here"), None);
    }

    #[test]
    fn the_cpus_a_process_may_use_are_read() {
        let own = cpus_allowed(std::process::id()).unwrap();
        assert!(
            !own.is_empty()
                && own
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b == b'-' || b == b',')
        );
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert!(cpus_allowed_by_command(comm.trim_end()).contains(&own));
        assert!(cpus_allowed_by_command("no-such-command-here").is_empty());
        assert_eq!(cpus_allowed(u32::MAX), None);
    }
}
