//! cgroup v2 directories owned by a test, for the socket hooks: created under the machine's
//! cgroup v2 mount (never the root itself), named `<prefix>-<pid>-<n>-<role>`, and removed
//! on drop with every process still in them killed first. Hooks attached to such a
//! directory act only on the processes the test moves there.
use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Where cgroup v2 is mounted on this machine.
pub fn cgroup2_root() -> Result<PathBuf> {
    lb_user::datapath::sockets::cgroup_root(None)
        .context("tests of the socket hooks need a cgroup v2 filesystem to make their cgroups in")
}

#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(prefix: &str, role: &str) -> Result<Cgroup> {
        let root = cgroup2_root()?;
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| remove_stale(&root, prefix));
        let name = format!("{prefix}-{}-{}-{role}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = root.join(name);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// The processes in it now.
    pub fn procs(&self) -> Vec<u32> {
        procs(&self.path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove(&self.path);
    }
}

fn procs(path: &Path) -> Vec<u32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills what is left inside (cgroup.kill, Linux 5.14) and removes the directory; bounded.
fn remove(path: &Path) {
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match fs::remove_dir(path) {
            Err(e) if e.kind() == io::ErrorKind::ResourceBusy || !procs(path).is_empty() => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => return,
        }
    }
}

/// Cgroups `<prefix>-<pid>-...` of test processes that are gone (killed before cleanup).
fn remove_stale(root: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(root) else { return };
    for name in entries.flatten().filter_map(|e| e.file_name().into_string().ok()) {
        let pid = name.strip_prefix(&format!("{prefix}-")).and_then(|rest| rest.split('-').next());
        if pid.and_then(|p| p.parse::<u32>().ok()).is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            remove(&root.join(name));
        }
    }
}
