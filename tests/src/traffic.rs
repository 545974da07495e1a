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

/// TCP and UDP echo on one address:port in a namespace; stops on drop.
pub struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

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
                    let _ = conn.read(&mut buf);
                    let _ = conn.write_all(reply.as_bytes());
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

/// One UDP request from inside `ns`, from `bind` (port 0 for any). The socket is
/// connected, as resolvers do: answers must come from `dst` itself, and an ICMP port
/// unreachable surfaces as ConnectionRefused.
pub fn udp_ask(ns: &str, bind: SocketAddrV4, dst: SocketAddrV4) -> io::Result<String> {
    in_netns(ns, move || {
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.connect(dst)?;
        s.send(b"hello")?;
        let mut buf = [0u8; 256];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
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
