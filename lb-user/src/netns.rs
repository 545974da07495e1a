//! Entering a named network namespace (as created by `ip netns add`) with setns(2).
//! Unlike `ip netns exec`, this keeps the mount namespace, so pins under /sys/fs/bpf stay
//! visible and outlive the process.
use std::{fs::File, io, os::fd::AsRawFd, path::PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("network namespace {name:?} ({}): {source}", path.display())]
pub struct Error {
    name: String,
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// Moves the calling thread into the named namespace. Call it before spawning threads:
/// threads created afterwards inherit it.
pub fn enter(name: &str) -> Result<(), Error> {
    let path = PathBuf::from("/run/netns").join(name);
    let err = |source| Error { name: name.to_string(), path: path.clone(), source };
    let file = File::open(&path).map_err(err)?;
    // SAFETY: setns on an fd we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}
