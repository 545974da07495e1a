//! A client process for labs (see `lb_tests::client`):
//! `lab-client --netns NS [--cgroup DIR] MODE DST [COUNT]`. It joins the cgroup and the
//! network namespace first, before it opens any socket (a socket belongs to the cgroup of
//! the process that creates it), then makes its requests and prints what it saw.
use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut netns = None;
    let mut cgroup = None;
    while args.len() >= 2 && args[0].starts_with("--") {
        let value = args.remove(1);
        match args.remove(0).as_str() {
            "--netns" => netns = Some(value),
            "--cgroup" => cgroup = Some(std::path::PathBuf::from(value)),
            other => bail!("unknown option {other}"),
        }
    }
    if let Some(dir) = &cgroup {
        // "0": the writing process itself.
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, "0").with_context(|| format!("joining cgroup {}", dir.display()))?;
    }
    let Some(netns) = netns else { bail!("--netns NS is required: a lab client never runs in the root namespace") };
    lb_user::netns::enter(&netns)?;
    lb_tests::client::client_main(&args)
}
