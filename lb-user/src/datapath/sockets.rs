//! What socket-level load balancing needs from the node: the cgroup v2 directory its hooks
//! attach to, and the cookie of the node's own network namespace (host-only mode tells the
//! node's sockets from pods' by it).
use std::{
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, MapData};
use lb_common::{map_names, SockConn};

use super::{batch, open_map, Error};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The connected sockets the hooks translated and still track (LB_SOCK_CONN), by cookie.
/// The mode the pinned socket hooks run in (`lb_common::sock_mode`): OFF when the map says
/// so or was never written.
pub fn mode(pin_dir: &Path) -> Result<u32, Error> {
    let name = lb_common::map_names::SOCK_CONFIG;
    let config: aya::maps::Array<_, lb_common::SockConfig> =
        super::open_map(pin_dir, name)?.try_into().map_err(|source| Error::Map { name, source })?;
    Ok(config.get(&0, 0).map_or(lb_common::sock_mode::OFF, |c| c.mode))
}

pub fn connections(pin_dir: &Path) -> Result<Vec<(u64, SockConn)>, Error> {
    let name = map_names::SOCK_CONN;
    let map: HashMap<MapData, u64, SockConn> =
        open_map(pin_dir, name)?.try_into().map_err(|source| Error::Map { name, source })?;
    batch::read_all(aya::maps::IterableMap::map(&map))
        .map_err(|source| Error::Io { path: pin_dir.join("maps").join(name), source })
}

/// The cgroup directory given (or found) is unusable; the message names the option.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "--cgroup-root not given and no cgroup v2 filesystem is mounted (no cgroup2 entry in \
         /proc/self/mountinfo); mount one (mount -t cgroup2 none /sys/fs/cgroup) or pass --cgroup-root"
    )]
    NoCgroup2,
    #[error("--cgroup-root {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--cgroup-root {}: not a directory of a cgroup v2 filesystem", path.display())]
    NotCgroup2 { path: PathBuf },
}

/// The cgroup the socket hooks attach to: `given`, or where cgroup v2 is mounted (its
/// root: every process of the node is under it). Checked to be a cgroup v2 directory.
pub fn cgroup_root(given: Option<&Path>) -> Result<PathBuf, CgroupError> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => {
            let mountinfo = fs::read_to_string("/proc/self/mountinfo")
                .map_err(|source| CgroupError::Unreadable { path: "/proc/self/mountinfo".into(), source })?;
            cgroup2_mount(&mountinfo).ok_or(CgroupError::NoCgroup2)?
        }
    };
    let meta = fs::metadata(&path).map_err(|source| CgroupError::Unreadable { path: path.clone(), source })?;
    if !meta.is_dir() || !is_cgroup2(&path) {
        return Err(CgroupError::NotCgroup2 { path });
    }
    Ok(path)
}

/// The mount point of the first cgroup2 filesystem in a mountinfo text (proc(5): the
/// fifth field is the mount point, the filesystem type follows the " - " separator).
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        (fs.split_whitespace().next() == Some("cgroup2")).then(|| mount.split_whitespace().nth(4).map(unescape))?
    })
}

/// Mount points in mountinfo escape space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    use std::os::unix::ffi::OsStringExt as _;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn is_cgroup2(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: statfs on a valid C string into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC }
}

/// The cookie of the calling thread's network namespace (SO_NETNS_COOKIE, Linux 5.14), the
/// value `bpf_get_netns_cookie` gives the hooks for sockets there.
pub fn netns_cookie() -> io::Result<u64> {
    // SAFETY: a socket we own (closed on drop), and getsockopt into a u64 of the size given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_in_mountinfo() {
        let hybrid = "25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      41 25 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n\
                      42 25 0:39 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "30 23 0:26 / /run/my\\040cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(unified), Some(PathBuf::from("/run/my cgroup")));
        assert_eq!(cgroup2_mount("42 25 0:39 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"), None);
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_is_refused_naming_the_option() {
        let err = cgroup_root(Some(Path::new("/"))).unwrap_err();
        assert_eq!(err.to_string(), "--cgroup-root /: not a directory of a cgroup v2 filesystem");
        let err = cgroup_root(Some(Path::new("/no/such/dir"))).unwrap_err();
        assert!(err.to_string().starts_with("--cgroup-root /no/such/dir: "), "{err}");
    }
}
