//! `completions` and `man`: shell completion scripts and manual pages, generated from the
//! same clap definitions that parse the command line, so they never drift from it.

use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory;

use super::{print, Cli};

/// Print the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "terok-shield", &mut script);
    Ok(print(&String::from_utf8(script)?)?)
}

/// Print the main manual page (roff) to stdout, or with `dir` write it and one page per
/// subcommand there (the main page's SUBCOMMANDS section refers to those).
pub fn man(dir: Option<&Path>) -> anyhow::Result<()> {
    let Some(dir) = dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(Cli::command()).render(&mut page)?;
        return Ok(print(&String::from_utf8(page)?)?);
    };
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create {}; choose a directory you can write to",
            dir.display()
        )
    })?;
    clap_mangen::generate_to(Cli::command(), dir).with_context(|| {
        format!(
            "cannot write the manual pages into {}; choose a directory you can write to",
            dir.display()
        )
    })?;
    Ok(print(&format!(
        "wrote terok-shield.1 and a page per subcommand to {}\n",
        dir.display()
    ))?)
}
