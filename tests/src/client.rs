//! Clients in processes of their own, for what cgroup hooks act on: a cgroup holds
//! processes, not threads, so a test's clients cannot share the test's process. The
//! `lab-client` binary joins the cgroup and the network namespace it is given (before it
//! opens any socket), makes its requests, and prints one line per request; [`run`] starts
//! it and reads them back, [`Held`] keeps one connection open under the test's control.
//!
//! Line format: `ok peer=<getpeername> from=<recvfrom source> answer=<text>` (`-` where the
//! request has none; an IPv4-mapped IPv6 address is shown as its IPv4 address), or
//! `err errno=<n> ms=<elapsed>`.
use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::traffic::{rr_connect_here, rr_keepalive_here, rr_udp_here, KEEP, TIMEOUT};

/// What one request came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok {
        /// getpeername() of the connected socket.
        peer: Option<SocketAddrV4>,
        /// The source recvfrom() reported for the answer.
        from: Option<SocketAddrV4>,
        answer: String,
    },
    Err {
        errno: i32,
        /// How long the failing call took.
        ms: u64,
    },
}

impl Outcome {
    /// The answer, or a panic naming what went wrong.
    pub fn answer(&self) -> &str {
        match self {
            Outcome::Ok { answer, .. } => answer,
            Outcome::Err { errno, ms } => {
                panic!("request failed: {} after {ms} ms", io::Error::from_raw_os_error(*errno))
            }
        }
    }

    fn line(result: io::Result<(Option<SocketAddrV4>, Option<SocketAddrV4>, String)>, started: Instant) -> String {
        let show = |a: Option<SocketAddrV4>| a.map_or("-".to_string(), |a| a.to_string());
        match result {
            Ok((peer, from, answer)) => format!("ok peer={} from={} answer={}", show(peer), show(from), answer.trim()),
            Err(e) => format!("err errno={} ms={}", e.raw_os_error().unwrap_or(0), started.elapsed().as_millis()),
        }
    }

    fn parse(line: &str) -> Option<Outcome> {
        let field = |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name)?.strip_prefix('='));
        let addr = |name: &str| field(name).and_then(|a| a.parse().ok());
        if line.starts_with("ok ") {
            let answer = line.split_once(" answer=")?.1.to_string();
            Some(Outcome::Ok { peer: addr("peer"), from: addr("from"), answer })
        } else if line.starts_with("err ") {
            Some(Outcome::Err { errno: field("errno")?.parse().ok()?, ms: field("ms")?.parse().ok()? })
        } else {
            None
        }
    }
}

/// The lab-client binary: $LB_CLIENT_BIN, or beside the running executable's target dir.
pub fn bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LB_CLIENT_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("lab-client"))
        .find(|c| c.is_file())
        .ok_or_else(|| anyhow!("lab-client not found next to {}; build it (`cargo build -p lb-tests`)", exe.display()))
}

fn command(ns: &str, cgroup: Option<&Path>, args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(bin()?);
    cmd.arg("--netns").arg(ns);
    if let Some(c) = cgroup {
        cmd.arg("--cgroup").arg(c);
    }
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    Ok(cmd)
}

/// Runs lab-client in `ns` (inside `cgroup` if given) with `args` (`MODE DST [COUNT]`, see
/// the binary) and returns one outcome per request. Bounded: killed after `limit`.
pub fn run(ns: &str, cgroup: Option<&Path>, args: &[&str], limit: Duration) -> Result<Vec<Outcome>> {
    let out = output(ns, cgroup, args, limit)?;
    out.lines().map(|l| Outcome::parse(l).ok_or_else(|| anyhow!("lab-client printed {l:?}"))).collect()
}

/// Runs lab-client and returns what it printed (for modes whose lines are not outcomes).
pub fn output(ns: &str, cgroup: Option<&Path>, args: &[&str], limit: Duration) -> Result<String> {
    let mut child = command(ns, cgroup, args)?.spawn().context("starting lab-client")?;
    drop(child.stdin.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("lab-client {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().expect("piped").read_to_string(&mut out)?;
    child.stderr.take().expect("piped").read_to_string(&mut err)?;
    if !status.success() {
        bail!("lab-client {args:?} failed ({status}): {err}{out}");
    }
    Ok(out)
}

/// One kept socket in a lab-client process: a TCP connection (`hold`) or an unconnected
/// UDP socket (`hold-udp`); each [`Held::again`] is a request on it. The process is killed
/// on drop.
pub struct Held {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Held {
    /// Opens the socket from `ns` inside `cgroup` (`mode` `hold` or `hold-udp`); the first
    /// request's outcome comes with it.
    pub fn open(ns: &str, cgroup: &Path, mode: &str, dst: SocketAddrV4) -> Result<(Held, Outcome)> {
        let mut child = command(ns, Some(cgroup), &[mode, &dst.to_string()])?.spawn().context("starting lab-client")?;
        let stdin = child.stdin.take().expect("piped");
        let stdout: ChildStdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut held = Held { child, stdin, lines };
        let first = held.next()?;
        Ok((held, first))
    }

    /// Another request on the kept connection.
    pub fn again(&mut self) -> Result<Outcome> {
        self.stdin.write_all(b"again\n")?;
        self.stdin.flush()?;
        self.next()
    }

    fn next(&mut self) -> Result<Outcome> {
        let line = self.lines.recv_timeout(TIMEOUT * 2).map_err(|_| anyhow!("lab-client hold gave no answer"))?;
        Outcome::parse(&line).ok_or_else(|| anyhow!("lab-client printed {line:?}"))
    }

    /// The client process (to find its sockets' cgroup, for instance).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary's work, once it has joined its cgroup and namespace: `MODE DST [COUNT|SECONDS]`.
pub fn client_main(args: &[String]) -> Result<()> {
    let [mode, dst, rest @ ..] = args else { bail!("usage: MODE DST [COUNT|SECONDS]") };
    let dst4: SocketAddrV4 = dst.parse().with_context(|| format!("DST {dst:?}"))?;
    // tcp6, udp6, udp6-unconnected: IPv6 sockets to DST's IPv4-mapped address.
    let (mode, dst, any) = match mode.strip_prefix("tcp6").or(mode.strip_prefix("udp6")) {
        Some(rest) => (
            format!("{}{rest}", &mode[..3]),
            SocketAddr::V6(SocketAddrV6::new(dst4.ip().to_ipv6_mapped(), dst4.port(), 0, 0)),
            "[::]:0",
        ),
        None => (mode.clone(), SocketAddr::V4(dst4), "0.0.0.0:0"),
    };
    // The last argument: a count of requests, or for the rr modes seconds, which may be a
    // fraction (a benchmark's smoke run).
    let last = rest.first().map_or("1", String::as_str);
    let count = || -> Result<u64> { last.parse().with_context(|| format!("COUNT {last:?}")) };
    let seconds = || -> Result<Duration> {
        Duration::try_from_secs_f64(last.parse().with_context(|| format!("SECONDS {last:?}"))?)
            .with_context(|| format!("SECONDS {last:?}"))
    };
    let mut out = io::stdout().lock();
    let mut emit = |started: Instant, r| writeln!(out, "{}", Outcome::line(r, started));
    match mode.as_str() {
        // New connections: connect, getpeername, ask, read to the end.
        "tcp" => {
            for _ in 0..count()? {
                let started = Instant::now();
                emit(started, tcp_once(dst))?;
            }
        }
        // New connected UDP sockets: connect, getpeername, send, recvfrom.
        "udp" => {
            for _ in 0..count()? {
                let started = Instant::now();
                emit(started, udp_connected_once(any, dst))?;
            }
        }
        // One unconnected UDP socket: sendto and recvfrom, COUNT times.
        "udp-unconnected" => {
            let socket = UdpSocket::bind(any)?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            for _ in 0..count()? {
                let started = Instant::now();
                emit(started, udp_unconnected_once(&socket, dst))?;
            }
        }
        // One kept socket; a request at start and one per line on stdin.
        "hold" | "hold-udp" => {
            let mut tcp = None;
            let mut udp = None;
            if mode == "hold" {
                let s = TcpStream::connect_timeout(&dst, TIMEOUT)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                tcp = Some(s);
            } else {
                let s = UdpSocket::bind(any)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                udp = Some(s);
            }
            let mut stdin = io::stdin().lock();
            let mut line = String::new();
            loop {
                let started = Instant::now();
                let seen = match (&mut tcp, &udp) {
                    (Some(s), _) => keep_once(s),
                    (_, Some(s)) => udp_unconnected_once(s, dst),
                    _ => unreachable!("one socket is open"),
                };
                emit(started, seen)?;
                line.clear();
                if stdin.read_line(&mut line)? == 0 {
                    return Ok(());
                }
            }
        }
        // Benchmarks: request/response for SECONDS, keep-alive, a connection each, or
        // datagrams on one connected UDP socket.
        "rr-keepalive" => writeln!(out, "{}", rr_keepalive_here(dst4, seconds()?)?)?,
        "rr-connect" => writeln!(out, "{}", rr_connect_here(dst4, seconds()?))?,
        "rr-udp" => writeln!(out, "{}", rr_udp_here(dst4, seconds()?)?)?,
        other => bail!(
            "mode {other:?} is not tcp, udp, udp-unconnected (each also as tcp6, udp6, udp6-unconnected), hold, \
             hold-udp, rr-keepalive, rr-connect or rr-udp"
        ),
    }
    Ok(())
}

type Seen = (Option<SocketAddrV4>, Option<SocketAddrV4>, String);

fn v4(a: SocketAddr) -> Option<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().map(|ip| SocketAddrV4::new(ip, a.port())),
    }
}

fn tcp_once(dst: SocketAddr) -> io::Result<Seen> {
    let mut s = TcpStream::connect_timeout(&dst, TIMEOUT)?;
    let peer = v4(s.peer_addr()?);
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(b"hello\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok((peer, None, answer))
}

fn udp_connected_once(any: &str, dst: SocketAddr) -> io::Result<Seen> {
    let s = UdpSocket::bind(any)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.connect(dst)?;
    let peer = v4(s.peer_addr()?);
    s.send(b"hello")?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((peer, v4(from), String::from_utf8_lossy(&buf[..n]).into_owned()))
}

fn udp_unconnected_once(s: &UdpSocket, dst: SocketAddr) -> io::Result<Seen> {
    s.send_to(b"hello", dst)?;
    let mut buf = [0u8; 256];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((None, v4(from), String::from_utf8_lossy(&buf[..n]).into_owned()))
}

fn keep_once(s: &mut TcpStream) -> io::Result<Seen> {
    let peer = v4(s.peer_addr()?);
    s.write_all(KEEP)?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf)?;
    if n == 0 {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    Ok((peer, None, String::from_utf8_lossy(&buf[..n]).into_owned()))
}
