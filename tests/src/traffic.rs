//! Traffic inside lab namespaces: echo backends that answer with their name and the peer
//! address they saw, and clients. Every wait is bounded.
use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, Result};

use crate::lab::in_netns;

pub const TIMEOUT: Duration = Duration::from_secs(3);

/// A request that keeps its connection open: the echo answers it, and every later `KEEP`
/// on the connection, with one answer line each (keep-alive request/response).
pub const KEEP: &[u8] = b"keep\n";
/// How long a kept connection may stay idle at the echo.
const KEEP_IDLE: Duration = Duration::from_secs(30);

/// TCP and UDP echo on one address:port in a namespace; stops on drop.
pub struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// The longest a held connection ([`tcp_hold`]) stays open at the backend.
const HOLD_MAX: Duration = Duration::from_secs(60);

/// What a backend answers: `<name> saw <peer ip>:<peer port>`.
pub fn answer(name: &str, peer: std::net::SocketAddr) -> String {
    format!("{name} saw {peer}")
}

impl Echo {
    pub fn start(ns: &str, name: &str, addr: Ipv4Addr, port: u16) -> Result<Echo> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut threads = Vec::new();
        for udp in [false, true] {
            let (ns, name, stop, ready) = (ns.to_string(), name.to_string(), stop.clone(), ready_tx.clone());
            threads.push(std::thread::spawn(move || {
                if let Err(e) = lb_user::netns::enter(&ns) {
                    let _ = ready.send(Err(anyhow!("{e}")));
                    return;
                }
                let bound = if udp {
                    serve_udp(&name, addr, port, &stop, &ready)
                } else {
                    serve_tcp(&name, addr, port, &stop, &ready)
                };
                if let Err(e) = bound {
                    let _ = ready.send(Err(anyhow!("echo {name} on {addr}:{port}: {e}")));
                }
            }));
        }
        let echo = Echo { stop, threads };
        for _ in 0..2 {
            ready_rx.recv_timeout(TIMEOUT).map_err(|_| anyhow!("echo {name} did not start"))??;
        }
        Ok(echo)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_tcp(
    name: &str,
    addr: Ipv4Addr,
    port: u16,
    stop: &AtomicBool,
    ready: &mpsc::Sender<Result<()>>,
) -> io::Result<()> {
    let listener = TcpListener::bind((addr, port))?;
    // A deep accept queue, so bursts of connections are not dropped at the backend.
    // SAFETY: listen(2) again on our own listening socket only changes its backlog.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    listener.set_nonblocking(true)?;
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut conn, peer)) => {
                let reply = answer(name, peer);
                std::thread::spawn(move || {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(TIMEOUT));
                    let mut buf = [0u8; 64];
                    let n = conn.read(&mut buf).unwrap_or(0);
                    if &buf[..n] == b"hold\n" {
                        // A long-lived connection: answered at once, then echoing until the
                        // client closes it.
                        let _ = conn.write_all(format!("{reply}\n").as_bytes());
                        let _ = conn.set_read_timeout(Some(HOLD_MAX));
                        while let Ok(n @ 1..) = conn.read(&mut buf) {
                            if conn.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    } else if buf[..n].starts_with(KEEP) {
                        let _ = conn.set_read_timeout(Some(KEEP_IDLE));
                        let line = format!("{reply}\n");
                        while conn.write_all(line.as_bytes()).is_ok() && conn.read(&mut buf).is_ok_and(|n| n > 0) {}
                    } else {
                        let _ = conn.write_all(reply.as_bytes());
                    }
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(&listener, STOP_CHECK),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How often a server waiting for a connection looks at its stop flag.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// Waits until `fd` is readable (a connection to accept) or `timeout` passes: a new
/// connection is taken at once, not at the next tick of a sleep (which would add up to a
/// tick to every connection a benchmark times).
fn wait_readable(fd: &impl AsRawFd, timeout: Duration) {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one valid pollfd we own.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
}

fn serve_udp(
    name: &str,
    addr: Ipv4Addr,
    port: u16,
    stop: &AtomicBool,
    ready: &mpsc::Sender<Result<()>>,
) -> io::Result<()> {
    let socket = UdpSocket::bind((addr, port))?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let _ = ready.send(Ok(()));
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
            socket.send_to(answer(name, peer).as_bytes(), peer)?;
        }
    }
    Ok(())
}

/// One TCP request from inside `ns`: connect, send a line, read the answer to EOF.
pub fn tcp_ask(ns: &str, dst: SocketAddrV4) -> io::Result<String> {
    in_netns(ns, move || tcp_ask_here(dst))
}

/// The same, from the calling thread's namespace.
pub fn tcp_ask_here(dst: SocketAddrV4) -> io::Result<String> {
    let mut s = TcpStream::connect_timeout(&dst.into(), TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(b"hello\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// One TCP request from inside `ns` from the source `src` (a port in use toward another
/// destination may be used again).
pub fn tcp_ask_from(ns: &str, src: SocketAddrV4, dst: SocketAddrV4) -> io::Result<String> {
    in_netns(ns, move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&std::net::SocketAddr::from(src).into())?;
        socket.connect_timeout(&std::net::SocketAddr::from(dst).into(), TIMEOUT)?;
        let mut s: TcpStream = socket.into();
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(b"hello\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}

/// A long-lived connection to an [`Echo`] backend from inside `ns`: the backend's answer
/// (who it is), and the connection, which echoes ([`echo_round_trip`]) until dropped.
pub fn tcp_hold(ns: &str, dst: SocketAddrV4) -> io::Result<(String, TcpStream)> {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&dst.into(), TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(b"hold\n")?;
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while answer.last() != Some(&b'\n') && answer.len() < 128 {
            s.read_exact(&mut byte)?;
            answer.push(byte[0]);
        }
        Ok((String::from_utf8_lossy(&answer).trim().to_string(), s))
    })
}

/// Request/response rates and latencies of one client over a while.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RrStats {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

impl RrStats {
    fn of(mut latencies_us: Vec<u64>, errors: u64, seconds: f64) -> RrStats {
        latencies_us.sort_unstable();
        let at = |q: f64| {
            latencies_us
                .get(((latencies_us.len() as f64 * q) as usize).min(latencies_us.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        RrStats { requests: latencies_us.len() as u64, errors, seconds, p50_us: at(0.5), p99_us: at(0.99) }
    }

    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.seconds.max(f64::EPSILON)
    }
}

impl std::fmt::Display for RrStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "requests={} errors={} seconds={:.3} p50_us={} p99_us={}",
            self.requests, self.errors, self.seconds, self.p50_us, self.p99_us
        )
    }
}

impl std::str::FromStr for RrStats {
    type Err = anyhow::Error;

    /// The line [`RrStats`]'s Display writes (what lab-client prints for the rr modes).
    fn from_str(line: &str) -> Result<RrStats> {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .ok_or_else(|| anyhow!("no {name}= in {line:?}"))
        };
        let number =
            |name: &str| -> Result<u64> { field(name)?.parse().map_err(|e| anyhow!("{name} in {line:?}: {e}")) };
        Ok(RrStats {
            requests: number("requests")?,
            errors: number("errors")?,
            seconds: field("seconds")?.parse().map_err(|e| anyhow!("seconds in {line:?}: {e}"))?,
            p50_us: number("p50_us")?,
            p99_us: number("p99_us")?,
        })
    }
}

/// Request/response over one kept connection to an [`Echo`] for `duration`, from the
/// calling thread's namespace (pod to Service, keep-alive).
pub fn rr_keepalive_here(dst: SocketAddrV4, duration: Duration) -> io::Result<RrStats> {
    let mut s = TcpStream::connect_timeout(&dst.into(), TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_nodelay(true)?;
    let mut buf = [0u8; 256];
    let mut latencies = Vec::new();
    let started = std::time::Instant::now();
    while started.elapsed() < duration {
        let t = std::time::Instant::now();
        s.write_all(KEEP)?;
        // One answer line, which fits a read (it is written whole, and never batched: the
        // next request waits for it).
        if s.read(&mut buf)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the echo closed a kept connection"));
        }
        latencies.push(t.elapsed().as_micros() as u64);
    }
    Ok(RrStats::of(latencies, 0, started.elapsed().as_secs_f64()))
}

/// A new connection per request to an [`Echo`] for `duration` (what a client without
/// connection reuse pays: the connect, and the Service translation of a new flow).
pub fn rr_connect_here(dst: SocketAddrV4, duration: Duration) -> RrStats {
    let mut latencies = Vec::new();
    let mut errors = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < duration {
        let t = std::time::Instant::now();
        match tcp_ask_here(dst) {
            Ok(_) => latencies.push(t.elapsed().as_micros() as u64),
            Err(_) => errors += 1,
        }
    }
    RrStats::of(latencies, errors, started.elapsed().as_secs_f64())
}

/// Request/response over one connected UDP socket to an [`Echo`] for `duration`, from the
/// calling thread's namespace (as a resolver talks to a DNS Service). A datagram lost
/// either way ends the run with the error: the next answer could not be told apart.
pub fn rr_udp_here(dst: SocketAddrV4, duration: Duration) -> io::Result<RrStats> {
    let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.connect(dst)?;
    let mut buf = [0u8; 256];
    let mut latencies = Vec::new();
    let started = std::time::Instant::now();
    while started.elapsed() < duration {
        let t = std::time::Instant::now();
        s.send(b"hello")?;
        s.recv(&mut buf)?;
        latencies.push(t.elapsed().as_micros() as u64);
    }
    Ok(RrStats::of(latencies, 0, started.elapsed().as_secs_f64()))
}

/// One UDP request from inside `ns`, from `bind` (port 0 for any). The socket is
/// connected, as resolvers do: answers must come from `dst` itself, and an ICMP port
/// unreachable surfaces as ConnectionRefused.
pub fn udp_ask(ns: &str, bind: SocketAddrV4, dst: SocketAddrV4) -> io::Result<String> {
    in_netns(ns, move || udp_ask_here(bind, dst))
}

/// The same, from the calling thread's namespace.
pub fn udp_ask_here(bind: SocketAddrV4, dst: SocketAddrV4) -> io::Result<String> {
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.connect(dst)?;
    s.send(b"hello")?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// `total` TCP requests from `ns`, `concurrency` at a time; the answers in order.
pub fn tcp_burst(ns: &str, dst: SocketAddrV4, total: usize, concurrency: usize) -> Vec<io::Result<String>> {
    in_netns(ns, move || {
        let per_worker = total.div_ceil(concurrency);
        let workers: Vec<_> = (0..concurrency)
            .map(|w| {
                let n = per_worker.min(total.saturating_sub(w * per_worker));
                std::thread::spawn(move || (0..n).map(|_| tcp_ask_here(dst)).collect::<Vec<_>>())
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("worker")).collect()
    })
}

/// Splits an answer into (backend name, the peer address it saw).
pub fn parse_answer(answer: &str) -> Option<(String, SocketAddrV4)> {
    let (name, peer) = answer.trim().split_once(" saw ")?;
    Some((name.to_string(), peer.parse().ok()?))
}

/// A TCP server for bulk transfers: `PUT <n>\n` then n bytes is answered with the count of
/// bytes received; `GET <n>\n` with n bytes; `ECHO 0\n` echoes what follows until the
/// client closes (a long-lived connection). Stops on drop.
pub struct Bulk {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Bulk {
    pub fn start(ns: &str, addr: Ipv4Addr, port: u16) -> Result<Bulk> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (ns, stopped) = (ns.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            if let Err(e) = lb_user::netns::enter(&ns) {
                let _ = ready_tx.send(Err(anyhow!("{e}")));
                return;
            }
            let listener = match TcpListener::bind((addr, port)).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!("bulk server on {addr}:{port}: {e}")));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        std::thread::spawn(move || {
                            let _ = serve_bulk(conn);
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => return,
                }
            }
        });
        ready_rx.recv_timeout(TIMEOUT).map_err(|_| anyhow!("bulk server did not start"))??;
        Ok(Bulk { stop, thread: Some(thread) })
    }
}

impl Drop for Bulk {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bounded: a transfer that stalls (a path MTU black hole) fails in this time.
const BULK_TIMEOUT: Duration = Duration::from_secs(10);

fn serve_bulk(mut conn: TcpStream) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(BULK_TIMEOUT))?;
    conn.set_write_timeout(Some(BULK_TIMEOUT))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' && line.len() < 64 {
        conn.read_exact(&mut byte)?;
        line.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&line);
    let (verb, n) = text.trim().split_once(' ').unwrap_or(("", "0"));
    let n: usize = n.parse().unwrap_or(0);
    if verb == "GET" {
        conn.write_all(&vec![b'x'; n])?;
        return Ok(());
    }
    if verb == "ECHO" {
        let mut buf = [0u8; 1500];
        loop {
            match conn.read(&mut buf)? {
                0 => return Ok(()),
                k => conn.write_all(&buf[..k])?,
            }
        }
    }
    let mut got = 0;
    let mut buf = vec![0u8; 65536];
    while got < n {
        match conn.read(&mut buf)? {
            0 => break,
            k => got += k,
        }
    }
    conn.write_all(got.to_string().as_bytes())
}

/// Sends `n` bytes to a [`Bulk`] server from inside `ns`; the count it received.
pub fn bulk_put(ns: &str, dst: SocketAddrV4, n: usize) -> io::Result<usize> {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&dst.into(), TIMEOUT)?;
        s.set_read_timeout(Some(BULK_TIMEOUT))?;
        s.set_write_timeout(Some(BULK_TIMEOUT))?;
        s.write_all(format!("PUT {n}\n").as_bytes())?;
        s.write_all(&vec![b'y'; n])?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        out.trim().parse().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{out:?}: {e}")))
    })
}

/// Fetches `n` bytes from a [`Bulk`] server from inside `ns`; how many arrived.
pub fn bulk_get(ns: &str, dst: SocketAddrV4, n: usize) -> io::Result<usize> {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&dst.into(), TIMEOUT)?;
        s.set_read_timeout(Some(BULK_TIMEOUT))?;
        s.write_all(format!("GET {n}\n").as_bytes())?;
        let mut got = 0;
        let mut buf = vec![0u8; 65536];
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(got),
                k => got += k,
            }
        }
    })
}

/// A long-lived connection to a [`Bulk`] server's echo, opened from inside `ns` (the
/// socket stays in that namespace; using it from another thread is fine).
pub fn echo_connection(ns: &str, dst: SocketAddrV4) -> io::Result<TcpStream> {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&dst.into(), TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(b"ECHO 0\n")?;
        Ok(s)
    })
}

/// One round trip on an echo connection ([`echo_connection`], [`tcp_hold`]).
pub fn echo_round_trip(s: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    s.write_all(message)?;
    let mut back = vec![0u8; message.len()];
    s.read_exact(&mut back)?;
    if back != message {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "echoed something else"));
    }
    Ok(())
}

/// Sends `count` TCP SYNs from inside `ns` with raw sockets, from `src` with source ports
/// counting up from `first_port` (wrapping within 1024..65535), to `dst`: a bounded flood
/// of new flows, paced to about `per_second`.
pub fn syn_flood(
    ns: &str,
    src: Ipv4Addr,
    dst: SocketAddrV4,
    first_port: u16,
    count: usize,
    per_second: usize,
) -> io::Result<()> {
    in_netns(ns, move || {
        // SAFETY: a raw socket we own and close below; IP_HDRINCL: we write the IPv4 header.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(dst.ip().octets()) },
            sin_zero: [0; 8],
        };
        let started = std::time::Instant::now();
        let mut result = Ok(());
        for i in 0..count {
            let port = 1024 + ((first_port as usize - 1024 + i) % (65535 - 1024)) as u16;
            let frame = crate::packet::Frame::tcp(SocketAddrV4::new(src, port), dst, crate::packet::SYN).bytes();
            let packet = &frame[14..];
            // SAFETY: sending our own buffer to a valid sockaddr_in.
            let sent = unsafe {
                libc::sendto(
                    fd,
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&to as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if sent < 0 {
                result = Err(io::Error::last_os_error());
                break;
            }
            let due = Duration::from_secs_f64((i + 1) as f64 / per_second as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        // SAFETY: closing the fd we opened.
        unsafe { libc::close(fd) };
        result
    })
}

/// Continuous requests from inside a namespace, each timed, until stopped: TCP loops (a new
/// connection per request) and UDP loops (a new socket per request, each from the next of
/// its own ports, so no request continues an earlier flow).
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    outcomes: Arc<std::sync::Mutex<Vec<Outcome>>>,
}

/// When a request started, and the backend that answered (its name) or the error.
pub type Outcome = (std::time::Instant, Result<String, String>);

impl Load {
    /// `tcp_loops` TCP loops and one UDP loop per entry of `udp_first_ports`, each pausing
    /// `pause` between requests.
    pub fn start(ns: &str, dst: SocketAddrV4, tcp_loops: usize, udp_first_ports: &[u16], pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::default();
        let loops = std::iter::repeat_n(None, tcp_loops).chain(udp_first_ports.iter().map(|p| Some(*p)));
        let threads = loops
            .map(|udp| {
                let (ns, stop, out): (String, _, Arc<std::sync::Mutex<Vec<Outcome>>>) =
                    (ns.to_string(), stop.clone(), Arc::clone(&outcomes));
                std::thread::spawn(move || {
                    in_netns(&ns, move || {
                        let mut ports = udp.map(|first| first..first.saturating_add(10_000));
                        while !stop.load(Ordering::Relaxed) {
                            let started = std::time::Instant::now();
                            let result = match ports.as_mut() {
                                Some(ports) => udp_ask_here(
                                    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, ports.next().expect("a fresh port")),
                                    dst,
                                ),
                                None => tcp_ask_here(dst),
                            };
                            let who = result.map_err(|e| e.to_string()).and_then(|a| {
                                parse_answer(&a).map(|(name, _)| name).ok_or(format!("not a backend's answer: {a:?}"))
                            });
                            out.lock().unwrap().push((started, who));
                            std::thread::sleep(pause);
                        }
                    })
                })
            })
            .collect();
        Load { stop, threads, outcomes }
    }

    /// Stops every loop and returns what they saw.
    pub fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("load loop");
        }
        std::mem::take(&mut *self.outcomes.lock().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rr_stats_read_back_what_they_print() {
        let stats = RrStats { requests: 12_345, errors: 2, seconds: 2.001, p50_us: 21, p99_us: 4070 };
        assert_eq!(stats.to_string().parse::<RrStats>().unwrap(), stats);
        let err = "requests=1 errors=0 p50_us=3 p99_us=4".parse::<RrStats>().unwrap_err();
        assert!(err.to_string().contains("no seconds="), "{err}");
    }
}
