//! Project automation, run as `cargo xtask <command>` (see `.cargo/config.toml`).
//!
//! - `ci`: exactly what CI runs: format check, clippy with warnings denied on all targets,
//!   every test, and the docs with warnings denied.
//! - `bench`: the micro-benchmarks (`cargo bench`).

use std::process::Command;

use anyhow::{Context, Result, bail};

mod deps;

fn main() -> Result<()> {
    let task = std::env::args().nth(1);
    match task.as_deref() {
        Some("ci") => ci(),
        Some("bench") => bench(),
        _ => {
            eprintln!("usage: cargo xtask <ci|bench>");
            eprintln!("  ci     fmt check, clippy -D warnings, all tests, docs -D warnings");
            eprintln!("  bench  micro-benchmarks");
            std::process::exit(2);
        }
    }
}

fn cargo(arguments: &[&str]) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command.args(arguments);
    command
}

fn run(mut command: Command) -> Result<()> {
    eprintln!("xtask: running {command:?}");
    let status = command
        .status()
        .with_context(|| format!("could not start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn ci() -> Result<()> {
    run(cargo(&["fmt", "--all", "--", "--check"]))?;
    run(cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo(&["test", "--workspace", "--locked"]))?;
    let mut doc = cargo(&["doc", "--workspace", "--no-deps", "--locked"]);
    doc.env("RUSTDOCFLAGS", "-D warnings");
    run(doc)?;
    eprintln!("xtask: ci passed");
    Ok(())
}

fn bench() -> Result<()> {
    run(cargo(&[
        "bench",
        "--locked",
        "-p",
        "resync-log",
        "-p",
        "resync-broker",
    ]))
}
