//! The fake Kubernetes API server (lb_tests::fake_api) as a process, for labs that run it
//! inside a network namespace (`ip netns exec NS fake-apiserver --listen ADDR`).
//! Faults through `/fake/...` (see the module's documentation); stops on SIGTERM or ^C.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use lb_tests::fake_api::{Config, FakeApiServer};

#[derive(Parser)]
#[command(about = "An in-memory Kubernetes API server for tests (plain HTTP)")]
struct Args {
    /// Address to serve on; port 0 picks one (printed on the first line of stdout).
    #[arg(long)]
    listen: SocketAddr,
    /// How often an idle watch that asked for bookmarks gets one.
    #[arg(long, default_value_t = 5000)]
    bookmark_interval_ms: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = Config { bookmark_interval: Duration::from_millis(args.bookmark_interval_ms) };
    let server = FakeApiServer::bind(args.listen, config)?;
    // The first line is what a parent process reads to learn the address.
    println!("fake-apiserver listening on {}", server.url());
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
