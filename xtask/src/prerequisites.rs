//! What the test command needs besides Rust, checked in its first seconds: `redis-server`
//! and `redis-cli` (the Redis tests start their own servers, and their own cluster), `nginx`
//! (the load balancer of `examples/nginx-cluster`, which a browser test runs), `curl` (the README test), Node.js with npm (browser
//! tests), and Chromium (headless browser tests).
//!
//! Missing tools are installed with Debian's `apt-get` when this runs as root on a Debian-like
//! system (as CI and a fresh development machine do); otherwise `cargo xtask ci` stops at once
//! with the exact command to run, instead of failing minutes later in a way a newcomer must
//! decode.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

/// A tool the tests need, and the Debian packages that bring it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tool {
    pub(crate) name: &'static str,
    pub(crate) packages: &'static [&'static str],
}

pub(crate) const TOOLS: &[Tool] = &[
    Tool {
        name: "redis-server",
        packages: &["redis-server"],
    },
    Tool {
        name: "redis-cli",
        packages: &["redis-tools"],
    },
    Tool {
        name: "curl",
        packages: &["curl"],
    },
    Tool {
        name: "nginx",
        packages: &["nginx"],
    },
    Tool {
        name: "node",
        packages: &["nodejs", "npm"],
    },
    Tool {
        name: "npm",
        packages: &["npm"],
    },
    Tool {
        name: "chromium",
        packages: &["chromium"],
    },
];

/// What to do about the missing tools.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Everything is there.
    Ready,
    /// Install with this command (we may: root, apt-get present).
    Install(Vec<String>),
    /// Stop and tell the user to run this.
    Tell(String),
}

/// The plan for `missing` tools, given whether we may install them ourselves.
pub(crate) fn plan(missing: &[Tool], may_install: bool) -> Plan {
    if missing.is_empty() {
        return Plan::Ready;
    }
    let mut packages: Vec<&str> = missing
        .iter()
        .flat_map(|tool| tool.packages.iter().copied())
        .collect();
    packages.sort_unstable();
    packages.dedup();
    if may_install {
        let mut command = vec![
            "apt-get".to_owned(),
            "install".to_owned(),
            "-y".to_owned(),
            "-qq".to_owned(),
        ];
        command.extend(packages.iter().map(|package| (*package).to_owned()));
        Plan::Install(command)
    } else {
        Plan::Tell(format!(
            "sudo apt-get update && sudo apt-get install -y {}",
            packages.join(" ")
        ))
    }
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|directory| directory.join(name).is_file())
    })
}

/// The Chromium the browser tests drive: `CHROMIUM`, else Debian's.
pub(crate) fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned())
}

fn present(tool: &Tool) -> bool {
    if tool.name == "chromium" {
        return Path::new(&chromium()).is_file();
    }
    // Debian installs nginx in /usr/sbin, which a user's PATH may lack.
    on_path(tool.name) || (tool.name == "nginx" && Path::new("/usr/sbin/nginx").is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.starts_with(b"0"))
}

/// Checks the tools and installs or explains what is missing.
pub(crate) fn ensure() -> Result<()> {
    let missing: Vec<Tool> = TOOLS
        .iter()
        .filter(|tool| !present(tool))
        .copied()
        .collect();
    let may_install = is_root() && on_path("apt-get");
    match plan(&missing, may_install) {
        Plan::Ready => Ok(()),
        Plan::Tell(command) => bail!(
            "the tests need {} and this user cannot install them; run:\n\n    {command}\n\n\
             then `cargo xtask ci` again (or set CHROMIUM to another Chromium binary)",
            names(&missing)
        ),
        Plan::Install(command) => {
            eprintln!(
                "xtask: installing {} ({})",
                names(&missing),
                command.join(" ")
            );
            crate::run({
                let mut update = Command::new("apt-get");
                update.args(["update", "-qq"]);
                update
            })?;
            let mut install = Command::new(&command[0]);
            install
                .args(&command[1..])
                .env("DEBIAN_FRONTEND", "noninteractive");
            crate::run(install)?;
            let still: Vec<Tool> = missing.into_iter().filter(|tool| !present(tool)).collect();
            if !still.is_empty() {
                bail!("installed, but {} still missing", names(&still));
            }
            Ok(())
        }
    }
}

fn names(tools: &[Tool]) -> String {
    tools
        .iter()
        .map(|tool| tool.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str) -> Tool {
        *TOOLS
            .iter()
            .find(|tool| tool.name == name)
            .expect("a tool of the list")
    }

    #[test]
    fn nothing_missing_is_ready() {
        assert_eq!(plan(&[], true), Plan::Ready);
        assert_eq!(plan(&[], false), Plan::Ready);
    }

    #[test]
    fn root_installs_every_missing_package_once() {
        let missing = [tool("node"), tool("npm"), tool("chromium")];
        assert_eq!(
            plan(&missing, true),
            Plan::Install(
                [
                    "apt-get", "install", "-y", "-qq", "chromium", "nodejs", "npm"
                ]
                .map(str::to_owned)
                .to_vec()
            )
        );
    }

    #[test]
    fn others_are_told_the_exact_command() {
        assert_eq!(
            plan(&[tool("chromium")], false),
            Plan::Tell("sudo apt-get update && sudo apt-get install -y chromium".to_owned())
        );
    }
}
