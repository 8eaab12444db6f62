//! `cargo xtask fuzz [--seconds N] [target …]`: each fuzz target of `fuzz/` under libFuzzer
//! for a bounded time (60 s each by default), with this machine's stable toolchain.
//!
//! cargo-fuzz is installed from crates.io when missing. It runs without a sanitizer
//! (`-s none`): AddressSanitizer needs a nightly compiler, and the code under test forbids
//! `unsafe`, so what is left to find is panics, hangs and broken invariants, which libFuzzer's
//! coverage guidance finds without one. New inputs go to `target/fuzz-corpus/<target>` (the
//! tree's `fuzz/corpus/<target>` is read, never written, so it stays small); a crash is saved
//! under `target/fuzz-artifacts/<target>/` and fails the run. Copy an input worth keeping into
//! the tree's corpus by hand: `cargo test -p resync-fuzz` replays it on every CI run.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, run};

/// The targets, as in `fuzz/src/lib.rs` (`TARGETS`; a test there checks each has a binary).
const TARGETS: &[&str] = &[
    "client_frame",
    "server_frame",
    "websocket_inbox",
    "sse_encoder",
    "sse_parser",
    "cursor",
    "names",
    "query",
    "jwt",
    "payload",
];

pub(crate) fn fuzz(arguments: &[String]) -> Result<()> {
    let mut seconds = 60u64;
    let mut chosen = Vec::new();
    let mut rest = arguments.iter();
    while let Some(argument) = rest.next() {
        match argument.as_str() {
            "--seconds" => {
                seconds = rest
                    .next()
                    .context("--seconds needs a number")?
                    .parse()
                    .context("--seconds needs a number")?;
            }
            target if TARGETS.contains(&target) => chosen.push(target),
            other => bail!("unknown fuzz target or option {other:?}; targets: {TARGETS:?}"),
        }
    }
    if chosen.is_empty() {
        chosen = TARGETS.to_vec();
    }
    ensure_cargo_fuzz()?;
    for target in chosen {
        let scratch = Path::new("target/fuzz-corpus").join(target);
        let artifacts = Path::new("target/fuzz-artifacts").join(target);
        std::fs::create_dir_all(&scratch)?;
        std::fs::create_dir_all(&artifacts)?;
        let mut command = cargo(&[
            "fuzz",
            "run",
            "--fuzz-dir",
            "fuzz",
            "--sanitizer",
            "none",
            "--features",
            "libfuzzer",
            target,
        ]);
        command
            .arg(&scratch)
            .arg(Path::new("fuzz/corpus").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-rss_limit_mb=2048")
            .arg("-timeout=10")
            .arg(format!("-artifact_prefix={}/", artifacts.display()));
        run(command).with_context(|| {
            format!(
                "fuzz target {target} failed; the input is in {}",
                artifacts.display()
            )
        })?;
    }
    eprintln!("xtask: every fuzz target ran {seconds} s without a failure");
    Ok(())
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = cargo(&["fuzz", "--version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !installed {
        eprintln!("xtask: installing cargo-fuzz from crates.io");
        run(cargo(&["install", "cargo-fuzz", "--locked"]))?;
    }
    // The libFuzzer runtime is C++, built by libfuzzer-sys.
    if Command::new("c++").arg("--version").output().is_err() {
        bail!("libFuzzer needs a C++ compiler: apt-get install -y g++");
    }
    Ok(())
}
