//! Small load tools Debian has no package for (netperf is not in Debian): TCP request/response
//! with 1-byte messages, TCP connect/request/close, and UDP small-packet flood. They run inside
//! a pod namespace as `ip netns exec <ns> <xtask> bench tool ...` (the harness re-invokes its
//! own binary), print one JSON object on stdout and exit within a bounded time.
//!
//! Servers print `READY` on stdout once bound, so the harness waits for that line instead of
//! sleeping.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde::{Deserialize, Serialize};

/// Marker a UDP flood sends at the end, followed by its sent count (u64 LE).
const UDP_END: &[u8; 4] = b"END!";

#[derive(Debug, Subcommand)]
pub enum Tool {
    /// TCP server: echoes whatever it reads, one connection at a time (clients are sequential).
    TcpEcho {
        #[arg(long)]
        port: u16,
        /// Exit after this long even if nobody stops it.
        #[arg(long, default_value_t = 600)]
        max_seconds: u64,
    },
    /// TCP request/response: 1-byte ping-pong on one connection; rate and latency percentiles.
    Rr {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        seconds: f64,
    },
    /// TCP connections per second: connect, 1-byte request, 1-byte response, close.
    Crr {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        seconds: f64,
    },
    /// UDP sink: counts datagrams until the flood's end marker, or until a second without
    /// any after the first (the markers can all be lost when the pinned sink is starved on a
    /// busy machine), or the time limit.
    UdpSink {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 600)]
        max_seconds: u64,
    },
    /// UDP flood: small datagrams as fast as one socket can send them.
    UdpFlood {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        seconds: f64,
        /// UDP payload bytes (>= 8: it carries a sequence number).
        #[arg(long, default_value_t = 18)]
        payload: usize,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RrResult {
    pub transactions: u64,
    pub seconds: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CrrResult {
    pub connections: u64,
    pub failures: u64,
    pub seconds: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UdpSinkResult {
    pub received: u64,
    /// What the flood said it sent (0 when its end marker never arrived: the harness has the
    /// flood's own count).
    pub sent: u64,
    /// First to last datagram received.
    pub seconds: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UdpFloodResult {
    pub sent: u64,
    pub seconds: f64,
}

pub fn run(tool: Tool) -> Result<()> {
    let json = match tool {
        Tool::TcpEcho { port, max_seconds } => {
            tcp_echo(port, Duration::from_secs(max_seconds))?;
            return Ok(());
        }
        Tool::Rr { server, seconds } => serde_json::to_string(&rr(server, secs(seconds)?)?)?,
        Tool::Crr { server, seconds } => serde_json::to_string(&crr(server, secs(seconds)?)?)?,
        Tool::UdpSink { port, max_seconds } => {
            serde_json::to_string(&udp_sink(port, Duration::from_secs(max_seconds))?)?
        }
        Tool::UdpFlood {
            server,
            seconds,
            payload,
        } => serde_json::to_string(&udp_flood(server, secs(seconds)?, payload)?)?,
    };
    println!("{json}");
    Ok(())
}

fn secs(s: f64) -> Result<Duration> {
    if !(s > 0.0 && s <= 3600.0) {
        bail!("--seconds must be in (0, 3600], got {s}");
    }
    Ok(Duration::from_secs_f64(s))
}

fn ready() {
    println!("READY");
    // The harness blocks on this line: it must not sit in a buffer.
    let _ = std::io::stdout().flush();
}

fn tcp_echo(port: u16, max: Duration) -> Result<()> {
    let listener =
        TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind tcp {port}"))?;
    ready();
    serve_echo(&listener, max)
}

fn serve_echo(listener: &TcpListener, max: Duration) -> Result<()> {
    let deadline = Instant::now() + max;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        // Block in poll (not a sleep loop: that would add its granularity to every connect
        // of the connection-rate test), waking now and then to check the deadline.
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready_fds = unsafe { libc::poll(&mut pfd, 1, 200) };
        if ready_fds <= 0 {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("accept"),
        };
        // Sequential clients: serve this connection to its end. A stuck peer cannot hold us
        // longer than the read timeout.
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut s = stream;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    }
    Ok(())
}

fn rr(server: SocketAddr, dur: Duration) -> Result<RrResult> {
    let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5))
        .with_context(|| format!("connect {server}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut lat_ns: Vec<u32> = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    let mut b = [0u8; 1];
    loop {
        let t0 = Instant::now();
        if t0.duration_since(start) >= dur {
            break;
        }
        s.write_all(b"x").context("rr write")?;
        s.read_exact(&mut b)
            .context("rr read (server gone or 5 s without an answer)")?;
        lat_ns.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
    }
    let seconds = start.elapsed().as_secs_f64();
    lat_ns.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat_ns.is_empty() {
            return f64::NAN;
        }
        let i = ((lat_ns.len() as f64 - 1.0) * p).round() as usize;
        lat_ns[i] as f64 / 1000.0
    };
    Ok(RrResult {
        transactions: lat_ns.len() as u64,
        seconds,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    })
}

fn crr(server: SocketAddr, dur: Duration) -> Result<CrrResult> {
    let start = Instant::now();
    let (mut ok, mut failures) = (0u64, 0u64);
    let mut b = [0u8; 1];
    while start.elapsed() < dur {
        let mut one = || -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(2))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"x")?;
            s.read_exact(&mut b)?;
            Ok(())
        };
        match one() {
            Ok(()) => ok += 1,
            Err(_) => failures += 1,
        }
        if failures > 100 && ok == 0 {
            bail!("crr: 100 failed connections to {server} and none succeeded");
        }
    }
    Ok(CrrResult {
        connections: ok,
        failures,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn udp_sink(port: u16, max: Duration) -> Result<UdpSinkResult> {
    let sock = UdpSocket::bind(("0.0.0.0", port)).with_context(|| format!("bind udp {port}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    ready();
    count_datagrams(&sock, max)
}

/// Silence after which the flood is taken to be over.
const UDP_IDLE_END: Duration = Duration::from_secs(1);

fn count_datagrams(sock: &UdpSocket, max: Duration) -> Result<UdpSinkResult> {
    let deadline = Instant::now() + max;
    let mut buf = [0u8; 2048];
    let (mut received, mut sent) = (0u64, 0u64);
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(n) if n >= 12 && &buf[..4] == UDP_END => {
                sent = u64::from_le_bytes(buf[4..12].try_into().expect("8 bytes"));
                break;
            }
            Ok(_) => {
                received += 1;
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
            }
            Err(_) => {
                if last.is_some_and(|l| l.elapsed() >= UDP_IDLE_END) {
                    break;
                }
            }
        }
    }
    let seconds = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    Ok(UdpSinkResult {
        received,
        sent,
        seconds,
    })
}

fn udp_flood(server: SocketAddr, dur: Duration, payload: usize) -> Result<UdpFloodResult> {
    if !(8..=1400).contains(&payload) {
        bail!("--payload must be 8..=1400 bytes, got {payload}");
    }
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(server)?;
    let mut buf = vec![0u8; payload];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < dur {
        // Check the clock every 64 datagrams: Instant::now() per packet costs a visible share.
        for _ in 0..64 {
            buf[..8].copy_from_slice(&sent.to_le_bytes());
            // ENOBUFS/ECONNREFUSED happen under overload: count only what left the socket.
            if sock.send(&buf).is_ok() {
                sent += 1;
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    // The end marker may itself be lost under load: repeat it.
    let mut end = [0u8; 12];
    end[..4].copy_from_slice(UDP_END);
    end[4..].copy_from_slice(&sent.to_le_bytes());
    for _ in 0..20 {
        let _ = sock.send(&end);
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(UdpFloodResult { sent, seconds })
}

/// A server tool running in a namespace; killed (by pid) and reaped on drop.
pub struct ServerProcess {
    child: Child,
    stdout: BufReader<ChildStdout>,
    what: String,
}

impl ServerProcess {
    /// Starts `cmd` (stdout piped) and waits for its `READY` line.
    pub fn start(mut cmd: Command, what: &str) -> Result<Self> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().with_context(|| format!("spawn {what}"))?;
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .with_context(|| format!("read {what} stdout"))?;
        if line.trim() != "READY" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not start (said {line:?}); see its stderr above");
        }
        Ok(Self {
            child,
            stdout,
            what: what.to_string(),
        })
    }

    /// Waits (bounded) for the server to exit by itself and returns its JSON output.
    pub fn finish<T: for<'de> Deserialize<'de>>(mut self, limit: Duration) -> Result<T> {
        let deadline = Instant::now() + limit;
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("{} did not finish within {limit:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        self.stdout.read_to_string(&mut out)?;
        serde_json::from_str(out.trim()).with_context(|| format!("{} printed {out:?}", self.what))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs a client tool to completion and parses its JSON output.
pub fn run_client<T: for<'de> Deserialize<'de>>(mut cmd: Command, what: &str) -> Result<T> {
    let out = cmd
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("spawn {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let s = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(s.trim()).with_context(|| format!("{what} printed {s:?}"))
}

#[cfg(test)]
mod tests {
    //! The tools against each other on loopback (no privileges needed).
    use super::*;

    const SHORT: Duration = Duration::from_millis(300);

    #[test]
    fn rr_and_crr_against_the_echo_server() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || serve_echo(&listener, Duration::from_secs(2)));
        let r = rr(addr, SHORT).expect("rr");
        assert!(r.transactions > 10, "{r:?}");
        assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us, "{r:?}");
        let c = crr(addr, SHORT).expect("crr");
        assert!(c.connections > 10 && c.failures == 0, "{c:?}");
        server.join().expect("server thread").expect("server");
    }

    #[test]
    fn udp_flood_is_counted_by_the_sink() {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let addr = sock.local_addr().expect("addr");
        let sink = std::thread::spawn(move || count_datagrams(&sock, Duration::from_secs(10)));
        let f = udp_flood(addr, SHORT, 18).expect("flood");
        let r = sink.join().expect("sink thread").expect("sink");
        assert_eq!(
            r.sent, f.sent,
            "the sink learns the sent count from the end marker"
        );
        assert!(r.received > 0 && r.received <= f.sent, "{r:?} {f:?}");
    }

    #[test]
    fn crr_gives_up_on_a_closed_port() {
        // Bind then drop: nothing listens there any more.
        let addr = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let e = crr(addr, Duration::from_secs(10)).expect_err("no server");
        assert!(format!("{e:#}").contains("none succeeded"), "{e:#}");
    }
}
