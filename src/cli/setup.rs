//! `terok-shield setup [--user|--system] [--remove]`: install (or take out) the OCI hooks
//! where podman always looks, so that every start of a shielded container, including
//! `podman restart` and `podman start`, applies its firewall. `run` and `prepare` install the
//! user's hooks by themselves on first use; `setup` is for doing it ahead, system-wide, or
//! undoing it.

use anyhow::bail;

use super::prepare::{user_containers_conf, user_hooks_dir};
use super::{print, Context, SetupArgs};
use crate::effects::hooks::{
    self, remove_system, remove_user, self_binary, setup_system, setup_user,
    SYSTEM_CONTAINERS_CONF, SYSTEM_INSTALL_DIR,
};
use crate::effects::state::{StateStore, STATE_FILE};

/// Install or remove hooks for the current user (default when not root) or system-wide.
pub fn run(args: &SetupArgs, ctx: &Context) -> anyhow::Result<()> {
    let system = args.system || (!args.user && rustix::process::geteuid().is_root());
    if args.remove {
        return remove(system, args.force, ctx);
    }
    let binary = self_binary()?;
    if system {
        let dir = std::path::Path::new(SYSTEM_INSTALL_DIR);
        setup_system(&binary).map_err(|e| {
            anyhow::anyhow!("{e}; `setup --system` must run as root (or use `setup --user`)")
        })?;
        print(&format!(
            "Installed OCI hooks in {} (calling {}) and listed that directory in hooks_dir of {SYSTEM_CONTAINERS_CONF}.\nEvery podman user on this machine now re-applies shields on container restart.\n",
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

/// Take the hooks out. Refused while shielded containers of this user still exist, since
/// they would then start without their firewall (unless `--force`).
fn remove(system: bool, force: bool, ctx: &Context) -> anyhow::Result<()> {
    if !force {
        let store = StateStore::new(&ctx.paths.containers_dir);
        let shielded: Vec<String> = store
            .names()
            .into_iter()
            .filter(|n| store.dir(n).join(STATE_FILE).exists())
            .map(|n| n.to_string())
            .collect();
        if !shielded.is_empty() {
            let existing: Vec<String> = match crate::effects::podman::container_names() {
                Ok(names) => shielded.into_iter().filter(|n| names.contains(n)).collect(),
                Err(crate::effects::podman::PodmanError::NotFound) => Vec::new(),
                Err(e) => return Err(anyhow::Error::from(e).context(
                    "cannot check which shielded containers still exist; pass --force to remove the hooks anyway",
                )),
            };
            if !existing.is_empty() {
                bail!(
                    "shielded containers still exist ({}): without the hooks they would start with no firewall; remove them first (`podman rm NAME`), or pass --force",
                    existing.join(", ")
                );
            }
        }
    }
    let removed = if system {
        remove_system()
            .map_err(|e| anyhow::anyhow!("{e}; `setup --system --remove` must run as root"))?
    } else {
        remove_user(&user_hooks_dir(ctx), &user_containers_conf())?
    };
    let mut out = if removed.is_empty() {
        "No terok-shield OCI hooks were installed there; nothing removed.\n".to_string()
    } else {
        let mut out = String::new();
        if !removed.deleted.is_empty() {
            out.push_str("Removed the terok-shield OCI hooks:\n");
            for p in &removed.deleted {
                out.push_str(&format!("  {}\n", p.display()));
            }
        }
        if let Some(conf) = &removed.conf_edited {
            out.push_str(&format!(
                "Took the hook directory out of hooks_dir in {} (the file's other settings stay).\n",
                conf.display()
            ));
        }
        out
    };
    if let Some(still) = hooks::find_installed(&user_hooks_dir(ctx), &user_containers_conf()) {
        out.push_str(&format!(
            "Hooks remain in {} (podman still calls them).\n",
            still.dir().display()
        ));
    }
    Ok(print(&out)?)
}
