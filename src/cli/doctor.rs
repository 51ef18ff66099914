//! `doctor` (alias `check-environment`): can this host shield containers, and if not, what
//! to do about it. Gathers facts ([`crate::effects::doctor`]), lets the core judge them
//! ([`crate::core::doctor`]) and prints one line per check.

use std::path::PathBuf;

use anyhow::bail;

use super::{load_config, prepare, print, render_error, Context, DoctorArgs};
use crate::core::config::Config;
use crate::core::doctor::{evaluate, probe_script, ConfigFact, Report, Status};
use crate::effects::doctor::{gather, Inputs};
use crate::effects::paths::Paths;

/// Check the host; exit 1 (an error) when any check fails.
///
/// Runs without a usable configuration too: a broken config.yml is one of the findings.
pub fn run(args: &DoctorArgs, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let paths = Paths::from_process_env(state_dir);
    let config = match &paths {
        Ok(p) => load_config(&p.config_file)
            .map(|c| ConfigFact {
                file: p.config_file.clone(),
                exists: p.config_file.exists(),
                tier: c.dns.tier,
            })
            .map_err(|e| render_error(&e)),
        Err(e) => Err(e.to_string()),
    };
    let user_hooks_dir = paths.ok().map(|paths| {
        prepare::user_hooks_dir(&Context {
            paths,
            config: Config::default(),
        })
    });
    let report = evaluate(&gather(Inputs {
        config,
        user_hooks_dir,
        user_conf: prepare::user_containers_conf(),
        probe_script: probe_script(),
    }));
    if args.json {
        print(&format!("{}\n", serde_json::to_string(&report)?))?;
    } else {
        print(&render(&report))?;
    }
    let failures = report.failures();
    if failures > 0 {
        bail!(
            "{failures} check{} failed, so containers cannot be shielded on this host yet; apply the fix given for each `fail` and run `terok-shield doctor` again",
            if failures == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

/// One aligned line per check, its fix indented below it, and a summary line.
pub fn render(report: &Report) -> String {
    let width = report
        .checks
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for c in &report.checks {
        out.push_str(&format!(
            "{:<4}  {:<width$}  {}\n",
            c.status.as_str(),
            c.name,
            c.detail
        ));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("{:<4}  {:<width$}  fix: {fix}\n", "", ""));
        }
    }
    let warnings = report
        .checks
        .iter()
        .filter(|c| c.status == Status::Warn)
        .count();
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    out.push_str(&format!(
        "overall: {} ({}, {})\n",
        report.overall.as_str(),
        plural(report.failures(), "failure"),
        plural(warnings, "warning")
    ));
    out
}
