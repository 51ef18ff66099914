//! Entering a container's namespaces.
//!
//! Namespace files are opened in the parent (so errors are reported with paths) and joined
//! only in a freshly forked child, which is single-threaded as `setns(CLONE_NEWUSER)` requires.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

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
    pub fn open(user: Option<&Path>, net: Option<&Path>) -> Result<NsFiles, NsError> {
        let open = |p: &Path| {
            File::open(p).map_err(|source| NsError {
                path: p.to_path_buf(),
                source,
            })
        };
        Ok(NsFiles {
            user: user.map(open).transpose()?,
            net: net.map(open).transpose()?,
        })
    }

    /// Whether there is nothing to join.
    pub fn is_empty(&self) -> bool {
        self.user.is_none() && self.net.is_none()
    }

    /// Join the user namespace (if any), then the network namespace.
    ///
    /// Only async-signal-safe syscalls: callable between fork and exec.
    pub fn enter(&self) -> std::io::Result<()> {
        if let Some(user) = &self.user {
            move_into_link_name_space(user.as_fd(), Some(LinkNameSpaceType::User))?;
        }
        if let Some(net) = &self.net {
            move_into_link_name_space(net.as_fd(), Some(LinkNameSpaceType::Network))?;
        }
        Ok(())
    }
}
