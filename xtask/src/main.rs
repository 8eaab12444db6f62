//! Project automation, run as `cargo xtask <command>` (see `.cargo/config.toml`).
//!
//! - `ci`: exactly what CI runs: format check, clippy with warnings denied on all targets,
//!   every test, and the docs with warnings denied.
//! - `e2e`: the browser client's unit tests (`node --test`) and the end-to-end tests in
//!   headless Chromium against the real server binary (needs Node.js and Chromium).
//! - `bench`: load tests over loopback against a raw baseline, written to
//!   `docs/benchmarks.md` (`--quick` for a short run; `bench flood` runs only the flood
//!   scenario, legitimate subscribers beside bounded attacks, and prints its section).
//! - `micro`: the micro-benchmarks (`cargo bench`).
//! - `public-api`: the foreign types each library crate exposes, against the list in
//!   `public_api.rs` (part of `ci`).
//! - `fuzz`: every fuzz target of `fuzz/` under libFuzzer for a bounded time (`--seconds N`,
//!   60 by default; name targets to run only those). CI runs their smoke test instead
//!   (`cargo test -p resync-fuzz`, part of the workspace's tests).

use std::process::Command;

use anyhow::{Context, Result, bail};

mod bench;
mod deps;
mod fuzz;
mod prerequisites;
mod public_api;

fn main() -> Result<()> {
    let task = std::env::args().nth(1);
    match task.as_deref() {
        Some("ci") => ci(),
        Some("bench") if std::env::args().nth(2).as_deref() == Some("flood") => bench::flood_only(),
        Some("bench") if std::env::args().nth(2).as_deref() == Some("redis") => bench::redis_only(),
        Some("bench") if std::env::args().nth(2).as_deref() == Some("cluster") => {
            bench::cluster_only()
        }
        Some("bench") if std::env::args().nth(2).as_deref() == Some("disk") => bench::disk_only(),
        Some("bench") if std::env::args().nth(2).as_deref() == Some("keyed") => bench::keyed_only(),
        Some("bench") if std::env::args().nth(2).as_deref() == Some("presence") => {
            bench::presence_only()
        }
        Some("bench") if std::env::args().any(|argument| argument == "--report-only") => {
            bench::report_only()
        }
        Some("bench") => bench::bench(std::env::args().any(|argument| argument == "--quick")),
        Some("micro") => micro(),
        Some("e2e") => e2e(),
        Some("public-api") => public_api::check(),
        Some("fuzz") => fuzz::fuzz(&std::env::args().skip(2).collect::<Vec<_>>()),
        _ => {
            eprintln!("usage: cargo xtask <ci|e2e|bench|micro|fuzz>");
            eprintln!("  ci     fmt check, clippy -D warnings, all tests, docs -D warnings, e2e");
            eprintln!("  e2e    browser client unit tests and headless-Chromium end-to-end tests");
            eprintln!(
                "  bench  load tests against the raw baseline -> docs/benchmarks.md (--quick: short; \
                 --report-only: rewrite the report from the last run's figures; `bench flood|disk|redis|cluster|\
                 presence|keyed`: only those rows, printed)"
            );
            eprintln!("  micro  micro-benchmarks of the log and local fan-out (cargo bench)");
            eprintln!(
                "  fuzz   each fuzz target under libFuzzer (--seconds N, default 60; [target…])"
            );
            std::process::exit(2);
        }
    }
}

pub(crate) fn cargo(arguments: &[&str]) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command.args(arguments);
    command
}

pub(crate) fn run(mut command: Command) -> Result<()> {
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
    // First, in seconds: what the tests need besides Rust.
    prerequisites::ensure()?;
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
    let test_directories = test_working_directories()?;
    remove_data_directories(&test_directories)?;
    run(cargo(&["test", "--workspace", "--locked"]))?;
    stray_data_directories(&test_directories)?;
    public_api::check()?;
    let mut doc = cargo(&["doc", "--workspace", "--no-deps", "--locked"]);
    doc.env("RUSTDOCFLAGS", "-D warnings");
    run(doc)?;
    e2e()?;
    eprintln!("xtask: ci passed");
    Ok(())
}

pub(crate) fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(
            || std::path::PathBuf::from("."),
            std::path::Path::to_path_buf,
        )
}

/// Where tests run (each package's directory): a server a test starts on the default (disk)
/// broker without a `--data-dir` of its own would leave `resync-data` there.
fn test_working_directories() -> Result<Vec<std::path::PathBuf>> {
    let root = workspace_root();
    let mut directories = vec![root.join("tests"), root.join("xtask"), root.join("bench")];
    for parent in ["crates", "examples"] {
        let listing =
            std::fs::read_dir(root.join(parent)).with_context(|| format!("reading {parent}"))?;
        directories.extend(
            listing
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.path()),
        );
    }
    Ok(directories)
}

/// Removes what an earlier run left, so that the check after the tests sees only this run's.
fn remove_data_directories(directories: &[std::path::PathBuf]) -> Result<()> {
    for directory in directories {
        let data = directory.join("resync-data");
        if data.is_dir() {
            std::fs::remove_dir_all(&data)
                .with_context(|| format!("removing {}", data.display()))?;
        }
    }
    Ok(())
}

/// Fails when a test left a data directory in a package's directory: its server shared one
/// store with every other such test (and with the next run).
fn stray_data_directories(directories: &[std::path::PathBuf]) -> Result<()> {
    let stray: Vec<String> = directories
        .iter()
        .map(|directory| directory.join("resync-data"))
        .filter(|data| data.is_dir())
        .map(|data| data.display().to_string())
        .collect();
    if !stray.is_empty() {
        bail!(
            "tests left data directories of the default broker: {}; give the server such a \
             test starts a temporary --data-dir (TestServer and ServerProcess do)",
            stray.join(", ")
        );
    }
    Ok(())
}

/// The `*.test.js` files of a folder, sorted (Node 20's test runner takes no globs).
fn test_files(directory: &std::path::Path) -> Result<Vec<String>> {
    let mut files: Vec<String> = std::fs::read_dir(directory)
        .with_context(|| format!("reading {}", directory.display()))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| path.to_string_lossy().ends_with(".test.js"))
        .map(|path| path.to_string_lossy().into_owned())
        .collect();
    files.sort();
    Ok(files)
}

fn e2e() -> Result<()> {
    prerequisites::ensure()?;
    let root = workspace_root();
    let package = root.join("clients/browser");
    run(cargo(&[
        "build",
        "--locked",
        "-p",
        "resync-server",
        "--bin",
        "resync-server",
    ]))?;
    let mut install = Command::new("npm");
    install
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&package);
    run(install)?;
    let mut unit = Command::new("node");
    unit.arg("--test")
        .args(test_files(&package.join("test/unit"))?)
        .current_dir(&package);
    run(unit)?;
    let artifacts = root.join("target/e2e");
    std::fs::create_dir_all(&artifacts).context("creating target/e2e")?;
    let mut browser = Command::new("node");
    browser
        .args(["--test", "--test-concurrency=1"])
        .args(test_files(&package.join("test/e2e"))?)
        .current_dir(&package)
        .env("RESYNC_SERVER_BIN", root.join("target/debug/resync-server"))
        .env("RESYNC_E2E_ARTIFACTS", &artifacts)
        .env("CHROMIUM", prerequisites::chromium());
    run(browser)?;
    eprintln!(
        "xtask: e2e passed; screenshot in {}",
        artifacts.join("demo.png").display()
    );
    Ok(())
}

fn micro() -> Result<()> {
    run(cargo(&[
        "bench",
        "--locked",
        "-p",
        "resync-log",
        "-p",
        "resync-broker",
    ]))
}
