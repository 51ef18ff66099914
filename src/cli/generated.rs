//! `completions` and `man`: shell completion scripts and the manual page, generated from the
//! same clap definitions that parse the command line, so they never drift from it.

use clap::CommandFactory;

use super::{print, Cli};

/// Print the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut command = Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "terok-shield", &mut script);
    Ok(print(&String::from_utf8(script)?)?)
}

/// Print the manual page (roff) to stdout.
pub fn man() -> anyhow::Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
    Ok(print(&String::from_utf8(page)?)?)
}
