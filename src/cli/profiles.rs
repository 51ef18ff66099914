//! `terok-shield profiles`: which profile names exist and which file each one loads.
//!
//! Makes overrides visible: a user file named like a bundled profile silently replaces it
//! everywhere, which is exactly what a user debugging a rejected connection needs to see.

use serde_json::json;

use super::{print, Context, ProfilesArgs};
use crate::effects::profiles::{ProfileSource, ProfileStore};

/// Print every bundled and user profile as a table or a JSON array.
pub fn run(args: &ProfilesArgs, ctx: &Context) -> anyhow::Result<()> {
    let store = ProfileStore::new(&ctx.paths.profiles_dir);
    let profiles = store.list()?;

    if args.json {
        let value: Vec<_> = profiles
            .iter()
            .map(|p| {
                let (source, path) = match &p.source {
                    ProfileSource::Bundled => ("bundled", None),
                    ProfileSource::User(path) => ("user", Some(path.display().to_string())),
                };
                json!({
                    "name": p.name.as_str(),
                    "source": source,
                    "path": path,
                    "overrides_bundled": p.overrides_bundled,
                    "default": ctx.config.default_profiles.contains(&p.name),
                })
            })
            .collect();
        return Ok(print(&format!("{}\n", serde_json::to_string(&value)?))?);
    }

    let rows: Vec<(String, &str, String)> = profiles
        .iter()
        .map(|p| {
            let name = if ctx.config.default_profiles.contains(&p.name) {
                format!("{} *", p.name)
            } else {
                p.name.to_string()
            };
            match &p.source {
                ProfileSource::Bundled => (name, "bundled", String::new()),
                ProfileSource::User(path) => (
                    name,
                    if p.overrides_bundled {
                        "user (overrides bundled)"
                    } else {
                        "user"
                    },
                    path.display().to_string(),
                ),
            }
        })
        .collect();
    let name_w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(4);
    let source_w = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(6);
    let mut out = String::new();
    for (name, source, path) in &rows {
        let line = format!("{name:<name_w$}  {source:<source_w$}  {path}");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(&format!(
        "\n* = default profile (config default_profiles)\nadd your own as {}/NAME.txt\n",
        store.dir().display()
    ));
    Ok(print(&out)?)
}
