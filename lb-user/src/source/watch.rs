//! When to read the manifests again: on file-system events (`notify`, inotify on Linux),
//! once they have been quiet for a moment, so that a burst (an editor's save, the kubelet
//! swapping a ConfigMap's `..data`) is one change; on a slow poll where the path cannot
//! be watched (it does not exist yet, or inotify is out of instances); and when a retry
//! is asked for.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{
    event::{AccessKind, AccessMode},
    EventKind, RecommendedWatcher, RecursiveMode, Watcher,
};
use tokio::{
    sync::mpsc,
    time::{sleep_until, Instant},
};
use tracing::{info, warn};

/// A change is reported once events have stopped for this long...
const QUIET: Duration = Duration::from_millis(100);
/// ...or this long after its first event, if they never stop.
const MAX_DELAY: Duration = Duration::from_secs(1);
/// How often an unwatchable path is read.
pub const FALLBACK_POLL: Duration = Duration::from_secs(5);

pub struct ManifestWatch {
    path: PathBuf,
    watcher: Option<RecommendedWatcher>,
    tx: mpsc::Sender<()>,
    rx: mpsc::Receiver<()>,
    /// A change seen and not yet reported: its first and its latest event.
    pending: Option<(Instant, Instant)>,
    /// Report at this time whatever happens: the first read, a retry, a poll.
    wake_at: Option<Instant>,
    /// When the first event the maps do not serve yet arrived (see [`caught_up`](Self::caught_up)).
    unserved_since: Option<Instant>,
    warned: bool,
}

impl ManifestWatch {
    /// Watches `path` (a file, or a directory and everything under it). The first call
    /// to [`changed`](Self::changed) returns at once, for the first read.
    pub fn new(path: &Path) -> Self {
        // One slot is enough: a queued signal already says "something changed".
        let (tx, rx) = mpsc::channel(1);
        let mut watch = ManifestWatch {
            path: path.to_path_buf(),
            watcher: None,
            tx,
            rx,
            pending: None,
            wake_at: Some(Instant::now()),
            unserved_since: None,
            warned: false,
        };
        watch.ensure_watching();
        watch
    }

    /// Is the path watched for events (rather than polled)?
    pub fn is_watching(&self) -> bool {
        self.watcher.is_some()
    }

    /// Resolves when the manifests should be read again. Cancel-safe: what it has seen is
    /// kept in `self`, so a `select!` that drops it loses no change.
    pub async fn changed(&mut self) {
        loop {
            self.ensure_watching();
            let now = Instant::now();
            let settled = self.pending.map(|(first, last)| (last + QUIET).min(first + MAX_DELAY));
            if settled.is_some_and(|t| now >= t) || self.wake_at.is_some_and(|t| now >= t) {
                self.pending = None;
                self.wake_at = None;
                return;
            }
            if self.watcher.is_none() && self.wake_at.is_none() {
                self.wake_at = Some(now + FALLBACK_POLL);
            }
            let deadline = [settled, self.wake_at].into_iter().flatten().min();
            tokio::select! {
                Some(()) = self.rx.recv() => {
                    let t = Instant::now();
                    self.pending = Some((self.pending.map_or(t, |(first, _)| first), t));
                    self.unserved_since.get_or_insert(t);
                }
                _ = sleep_until(deadline.unwrap_or(now + MAX_DELAY)), if deadline.is_some() => {}
            }
        }
    }

    /// The maps now serve everything read so far: how long ago the first event they did not
    /// serve yet arrived (None: no event since the last call). A read that failed is not
    /// caught up: its events count from their arrival until a later read succeeds.
    pub fn caught_up(&mut self) -> Option<Duration> {
        self.unserved_since.take().map(|t| t.elapsed())
    }

    /// Asks for a read after `delay` even if nothing changes (a retry).
    pub fn retry_in(&mut self, delay: Duration) {
        let at = Instant::now() + delay;
        self.wake_at = Some(self.wake_at.map_or(at, |t| t.min(at)));
    }

    /// The path could not be read: its watch (if any) may be on a directory that is gone,
    /// so watch it afresh once it is back.
    pub fn rewatch(&mut self) {
        self.watcher = None;
    }

    fn ensure_watching(&mut self) {
        if self.watcher.is_some() {
            return;
        }
        match self.watch() {
            Ok(w) => {
                if self.warned {
                    info!(path = %self.path.display(), "watching the manifests for changes again");
                }
                self.watcher = Some(w);
                self.warned = false;
                // Whatever happened while unwatched was not seen: read now.
                self.wake_at = Some(Instant::now());
            }
            Err(e) if !self.warned => {
                warn!(
                    "cannot watch {} for changes ({e}); reading it every {FALLBACK_POLL:?} instead",
                    self.path.display()
                );
                self.warned = true;
            }
            Err(_) => {}
        }
    }

    fn watch(&self) -> notify::Result<RecommendedWatcher> {
        let tx = self.tx.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Opening and reading change nothing, and reading the manifests is what we do next.
            let read_only = |kind: &EventKind| matches!(kind, EventKind::Access(a) if !matches!(a, AccessKind::Close(AccessMode::Write)));
            if event.is_ok_and(|e| !read_only(&e.kind)) {
                // Full means a signal is already queued.
                let _ = tx.try_send(());
            }
        })?;
        // A file is watched through its directory: editors and `kubectl`-style tools
        // replace a file by renaming another over it, which a watch on the file misses.
        let is_dir = std::fs::metadata(&self.path).map_err(notify::Error::io)?.is_dir();
        match (is_dir, self.path.parent()) {
            (false, Some(parent)) if !parent.as_os_str().is_empty() => {
                watcher.watch(parent, RecursiveMode::NonRecursive)?
            }
            (false, _) => watcher.watch(Path::new("."), RecursiveMode::NonRecursive)?,
            (true, _) => watcher.watch(&self.path, RecursiveMode::Recursive)?,
        }
        Ok(watcher)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Lays out a ConfigMap volume the way the kubelet's AtomicWriter does, and swaps it.
    pub(crate) struct ConfigMapDir {
        pub path: PathBuf,
        version: usize,
    }

    impl ConfigMapDir {
        pub fn new(name: &str, files: &[(&str, &str)]) -> Self {
            let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            let mut dir = ConfigMapDir { path, version: 0 };
            dir.update(files, |_| {});
            dir
        }

        /// Writes the new version, then follows the kubelet's order: a timestamped
        /// directory, `..data_tmp` renamed over `..data`, links for added keys, removal of
        /// links of dropped keys, removal of the old directory. `between` runs after each step.
        pub fn update(&mut self, files: &[(&str, &str)], mut between: impl FnMut(&str)) {
            use std::os::unix::fs::symlink;
            let old = std::fs::read_link(self.path.join("..data")).ok();
            self.version += 1;
            let ts = format!("..2026_12_01_00_00_0{}.{}", self.version, 1000 + self.version);
            std::fs::create_dir(self.path.join(&ts)).unwrap();
            for (name, text) in files {
                std::fs::write(self.path.join(&ts).join(name), text).unwrap();
            }
            between("snapshot written");
            symlink(&ts, self.path.join("..data_tmp")).unwrap();
            std::fs::rename(self.path.join("..data_tmp"), self.path.join("..data")).unwrap();
            between("..data swapped");
            for (name, _) in files {
                let link = self.path.join(name);
                if std::fs::symlink_metadata(&link).is_err() {
                    symlink(Path::new("..data").join(name), &link).unwrap();
                }
            }
            between("new keys linked");
            for entry in std::fs::read_dir(&self.path).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') && !files.iter().any(|(f, _)| *f == name) {
                    std::fs::remove_file(self.path.join(&name)).unwrap();
                }
            }
            between("dropped keys unlinked");
            if let Some(old) = old {
                std::fs::remove_dir_all(self.path.join(old)).unwrap();
            }
        }
    }

    impl Drop for ConfigMapDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }

    /// Polls `changed` without waiting past `limit`: true if it reported a change.
    async fn changed_within(watch: &mut ManifestWatch, limit: Duration) -> bool {
        tokio::time::timeout(limit, watch.changed()).await.is_ok()
    }

    #[tokio::test]
    async fn a_configmap_swap_is_one_change() {
        let mut dir = ConfigMapDir::new("lb-watch-test", &[("a.yaml", "a: 1\n")]);
        let mut watch = ManifestWatch::new(&dir.path);
        assert!(watch.is_watching());
        assert!(changed_within(&mut watch, Duration::from_millis(50)).await, "the first call is the first read");
        assert!(!changed_within(&mut watch, Duration::from_millis(300)).await, "nothing changed");
        dir.update(&[("a.yaml", "a: 2\n"), ("b.yaml", "b: 1\n")], |_| {});
        assert!(changed_within(&mut watch, Duration::from_secs(3)).await, "the swap is seen");
        assert!(!changed_within(&mut watch, Duration::from_millis(400)).await, "and seen once");
    }

    #[tokio::test]
    async fn a_missing_path_is_polled_and_a_retry_comes_when_asked() {
        // An empty ConfigMapDir owns the path (removed on drop, also on a panic); the
        // test starts without it.
        let dir = ConfigMapDir::new("lb-watch-missing", &[]);
        let path = dir.path.clone();
        std::fs::remove_dir_all(&path).unwrap();
        let mut watch = ManifestWatch::new(&path);
        assert!(!watch.is_watching());
        assert!(changed_within(&mut watch, Duration::from_millis(50)).await);
        watch.retry_in(Duration::from_millis(100));
        assert!(changed_within(&mut watch, Duration::from_millis(500)).await, "the retry");
        std::fs::create_dir_all(&path).unwrap();
        // Once it is there it is read, and from then on watched.
        assert!(changed_within(&mut watch, FALLBACK_POLL + Duration::from_secs(1)).await);
        assert!(watch.is_watching());
        assert!(!changed_within(&mut watch, Duration::from_millis(300)).await, "nothing changed since");
        std::fs::write(path.join("x.yaml"), "x: 1\n").unwrap();
        assert!(changed_within(&mut watch, Duration::from_secs(3)).await);
    }

    #[tokio::test]
    async fn caught_up_says_how_long_since_the_first_event_not_yet_served() {
        let dir = ConfigMapDir::new("lb-watch-caught-up", &[("a.yaml", "a: 1\n")]);
        let mut watch = ManifestWatch::new(&dir.path);
        assert!(changed_within(&mut watch, Duration::from_millis(50)).await);
        assert_eq!(watch.caught_up(), None, "the first read follows no event");
        let written = std::time::Instant::now();
        std::fs::write(dir.path.join("a.yaml"), "a: 2\n").unwrap();
        assert!(changed_within(&mut watch, Duration::from_secs(3)).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waited = watch.caught_up().expect("an event was seen");
        // From the event (after the write) to now: at least the quiet time and the sleep.
        assert!(waited >= QUIET + Duration::from_millis(50) && waited <= written.elapsed(), "{waited:?}");
        assert_eq!(watch.caught_up(), None, "taken once");
    }
}
