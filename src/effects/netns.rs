//! Entering a container's namespaces.
//!
//! Namespace files are opened in the parent (so errors are reported with paths) and joined
//! only in a freshly forked child, which is single-threaded as `setns(CLONE_NEWUSER)` requires.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use rustix::process::{Gid, Uid};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
use thiserror::Error;

/// A namespace file could not be opened.
#[derive(Debug, Error)]
#[error(
    "cannot open namespace {path}: {source}; is the container (or test namespace) still running?"
)]
pub struct NsError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Opened namespace files, ready to be joined after fork.
#[derive(Debug)]
pub struct NsFiles {
    user: Option<File>,
    net: Option<File>,
}

impl NsFiles {
    /// Open the namespace files (either may be absent).
    ///
    /// A user namespace this process already lives in is not joined: `setns()` into one's
    /// own user namespace fails with EINVAL, which is the case of a rootful container (its
    /// process shares root's initial user namespace) reached by root.
    pub fn open(user: Option<&Path>, net: Option<&Path>) -> Result<NsFiles, NsError> {
        let open = |p: &Path| {
            File::open(p).map_err(|source| NsError {
                path: p.to_path_buf(),
                source,
            })
        };
        let user = match (user, user.map(open).transpose()?) {
            (Some(path), Some(file)) if is_own_namespace(path, &file, "user")? => None,
            (_, file) => file,
        };
        Ok(NsFiles {
            user,
            net: net.map(open).transpose()?,
        })
    }

    /// Whether there is nothing to join.
    pub fn is_empty(&self) -> bool {
        self.user.is_none() && self.net.is_none()
    }

    /// Whether a user namespace is to be joined (which needs a single-threaded process).
    pub fn has_user(&self) -> bool {
        self.user.is_some()
    }

    /// Join the user namespace (if any), then the network namespace.
    ///
    /// Only async-signal-safe syscalls: callable between fork and exec.
    pub fn enter(&self) -> std::io::Result<()> {
        if let Some(user) = &self.user {
            move_into_link_name_space(user.as_fd(), Some(LinkNameSpaceType::User))?;
            // Become the namespace's root (as `nsenter -U` does). The owner already maps to
            // it; anyone else (root on the host) would otherwise be unmapped, and exec would
            // drop every capability the namespace just granted.
            rustix::thread::set_thread_res_gid(Gid::ROOT, Gid::ROOT, Gid::ROOT)?;
            rustix::thread::set_thread_res_uid(Uid::ROOT, Uid::ROOT, Uid::ROOT)?;
        }
        if let Some(net) = &self.net {
            move_into_link_name_space(net.as_fd(), Some(LinkNameSpaceType::Network))?;
        }
        Ok(())
    }
}

/// Whether the opened namespace file `file` is this process's own namespace of `kind`
/// (`user`, `net`): same device and inode as `/proc/self/ns/KIND`.
fn is_own_namespace(path: &Path, file: &File, kind: &str) -> Result<bool, NsError> {
    use std::os::unix::fs::MetadataExt;
    let own_path = PathBuf::from(format!("/proc/self/ns/{kind}"));
    let failed = |path: PathBuf| move |source| NsError { path, source };
    let theirs = file.metadata().map_err(failed(path.to_path_buf()))?;
    let ours = std::fs::metadata(&own_path).map_err(failed(own_path.clone()))?;
    Ok(theirs.dev() == ours.dev() && theirs.ino() == ours.ino())
}

/// Whether the network namespace at `path` is the one this process is in.
///
/// The shield must never load its ruleset into the host's own namespace (a container on the
/// host network, a PID that is not the container's): callers refuse when this is true.
pub fn is_own_netns(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let theirs = std::fs::metadata(path)?;
    let ours = std::fs::metadata("/proc/self/ns/net")?;
    Ok(theirs.dev() == ours.dev() && theirs.ino() == ours.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_its_own_namespace() {
        assert!(is_own_netns(Path::new("/proc/self/ns/net")).unwrap());
        assert!(is_own_netns(Path::new(&format!("/proc/{}/ns/net", std::process::id()))).unwrap());
        assert!(is_own_netns(Path::new("/nonexistent")).is_err());
    }

    /// Root reaching a rootful container: the target's user namespace is our own, and
    /// joining it would fail with EINVAL; it is left out, the network namespace is kept.
    #[test]
    fn own_user_namespace_is_not_joined() {
        let own = Path::new("/proc/self/ns/user");
        let ns = NsFiles::open(Some(own), Some(Path::new("/proc/self/ns/net"))).unwrap();
        assert!(
            ns.user.is_none(),
            "would setns() into its own user namespace"
        );
        assert!(ns.net.is_some());
        assert!(NsFiles::open(None, None).unwrap().is_empty());
    }
}
