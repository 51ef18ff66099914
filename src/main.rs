//! The `terok-shield` binary: parse the command line, run the command, report failure.
//!
//! Exit codes (stable; scripts may rely on them):
//! - `0`: success (also when stdout is closed early, e.g. `terok-shield profiles | head -1`).
//! - `1`: the command failed: bad input, a bad `config.yml` or profile, an unknown profile,
//!   or a system error. One message on stderr, `terok-shield: error: ...`, says what went
//!   wrong, every underlying cause, and how to fix it.
//! - `2`: usage error (unknown option, missing argument, conflicting flags), reported by clap
//!   together with the relevant usage line.

use std::io;
use std::process::ExitCode;

use clap::Parser;
use terok_shield::cli::{self, Cli};

fn main() -> ExitCode {
    // The OCI hooks run at every container start and stop: their exact command lines skip
    // building the whole command-line parser (a quarter of a millisecond).
    let result = match cli::hook_fast_path(std::env::args_os()) {
        Some(result) => result,
        None => cli::run(Cli::parse()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("terok-shield: error: {}", cli::render_error(&e));
            ExitCode::from(1)
        }
    }
}

/// A reader that stopped reading (`| head`) is not a failure of ours.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}
