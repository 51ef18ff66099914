//! `terok-shield setup [--user|--system]`: install the OCI hooks where podman always looks,
//! so that `podman restart` and `podman start` re-apply the firewall.

use super::prepare::{user_containers_conf, user_hooks_dir};
use super::{print, Context};
use crate::effects::hooks::{self, self_binary, setup_user, write_descriptors, SYSTEM_INSTALL_DIR};

/// Install hooks for the current user (default when not root) or system-wide.
pub fn run(user: bool, system: bool, ctx: &Context) -> anyhow::Result<()> {
    let binary = self_binary()?;
    let system = system || (!user && rustix::process::geteuid().is_root());
    if system {
        let dir = std::path::Path::new(SYSTEM_INSTALL_DIR);
        write_descriptors(dir, &binary).map_err(|e| {
            anyhow::anyhow!("{e}; `setup --system` must run as root (or use `setup --user`)")
        })?;
        print(&format!(
            "Installed OCI hooks in {} (calling {}).\nEvery podman user on this machine now re-applies shields on container restart.\n",
            dir.display(),
            binary.display()
        ))?;
    } else {
        let dir = user_hooks_dir(ctx);
        let conf = user_containers_conf();
        setup_user(&dir, &conf, &binary)?;
        print(&format!(
            "Installed OCI hooks in {} (calling {}) and added that directory to hooks_dir in {}.\nShielded containers now keep their firewall across podman restart/start.\n",
            dir.display(),
            binary.display(),
            conf.display()
        ))?;
    }
    if hooks::find_installed(&user_hooks_dir(ctx), &user_containers_conf()).is_none() {
        anyhow::bail!(
            "the hooks were written but are not where podman looks; check containers.conf"
        );
    }
    Ok(())
}
