//! The dependency rule of the workspace, checked against `cargo metadata`.
//!
//! Dependencies point one way, from the bottom up:
//! `protocol <- log <- broker <- broker-redis`, `broker <- actix <- server`,
//! `protocol <- client`. The protocol crate knows no runtime and no HTTP; the client never
//! depends on actix, the broker or the log; the actix crate never names Redis.

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::process::Command;

    use serde_json::Value;

    /// For each library crate, the workspace crates it may depend on (normal dependencies).
    const ALLOWED: &[(&str, &[&str])] = &[
        ("resync-protocol", &[]),
        ("resync-log", &["resync-protocol"]),
        ("resync-broker", &["resync-protocol", "resync-log"]),
        (
            "resync-broker-redis",
            &["resync-protocol", "resync-log", "resync-broker"],
        ),
        (
            "resync-actix",
            &["resync-protocol", "resync-log", "resync-broker"],
        ),
        ("resync-client", &["resync-protocol"]),
        ("resync-cli", &["resync-protocol", "resync-client"]),
        (
            "resync-server",
            &[
                "resync-protocol",
                "resync-log",
                "resync-broker",
                "resync-broker-redis",
                "resync-actix",
            ],
        ),
    ];

    /// External crates that must never appear anywhere below a given crate.
    const FORBIDDEN_BELOW: &[(&str, &[&str])] = &[
        (
            "resync-protocol",
            &["tokio", "actix-web", "actix-http", "hyper", "http", "redis"],
        ),
        ("resync-log", &["tokio", "actix-web", "hyper", "redis"]),
        (
            "resync-broker",
            &["actix-web", "actix-http", "hyper", "redis"],
        ),
        ("resync-actix", &["redis", "deadpool-redis"]),
        (
            "resync-client",
            &["actix-web", "actix-http", "actix-codec", "redis"],
        ),
    ];

    fn metadata() -> Value {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let output = Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--locked"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .output()
            .expect("cargo metadata runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints json")
    }

    fn name_of(id: &str, packages: &[Value]) -> String {
        packages
            .iter()
            .find(|package| package["id"] == id)
            .and_then(|package| package["name"].as_str())
            .unwrap_or(id)
            .to_owned()
    }

    /// Normal (non-dev, non-build) dependencies of each package, by name.
    fn normal_graph(metadata: &Value) -> BTreeMap<String, BTreeSet<String>> {
        let packages = metadata["packages"].as_array().expect("packages");
        let mut graph = BTreeMap::new();
        for node in metadata["resolve"]["nodes"]
            .as_array()
            .expect("resolve nodes")
        {
            let name = name_of(node["id"].as_str().expect("id"), packages);
            let mut dependencies = BTreeSet::new();
            for dependency in node["deps"].as_array().expect("deps") {
                let normal = dependency["dep_kinds"]
                    .as_array()
                    .expect("dep_kinds")
                    .iter()
                    .any(|kind| kind["kind"].is_null());
                if normal {
                    dependencies
                        .insert(name_of(dependency["pkg"].as_str().expect("pkg"), packages));
                }
            }
            graph
                .entry(name)
                .or_insert_with(BTreeSet::new)
                .extend(dependencies);
        }
        graph
    }

    fn below(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start.to_owned()];
        while let Some(current) = stack.pop() {
            for dependency in graph.get(&current).into_iter().flatten() {
                if seen.insert(dependency.clone()) {
                    stack.push(dependency.clone());
                }
            }
        }
        seen
    }

    #[test]
    fn workspace_dependencies_point_one_way() {
        let metadata = metadata();
        let graph = normal_graph(&metadata);
        let members: Vec<String> = metadata["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .filter(|package| package["source"].is_null())
            .filter_map(|package| package["name"].as_str().map(str::to_owned))
            // Test, fuzz and benchmark harnesses may use anything.
            .filter(|name| {
                name.starts_with("resync-")
                    && !["resync-tests", "resync-bench", "resync-fuzz"].contains(&name.as_str())
            })
            .collect();
        for member in &members {
            let allowed = ALLOWED
                .iter()
                .find(|(name, _)| name == member)
                .unwrap_or_else(|| {
                    panic!("{member} is not in the dependency rule; add it to ALLOWED")
                })
                .1;
            for dependency in graph.get(member).into_iter().flatten() {
                if dependency.starts_with("resync-") {
                    assert!(
                        allowed.contains(&dependency.as_str()),
                        "{member} must not depend on {dependency}"
                    );
                }
            }
        }
        for (crate_name, forbidden) in FORBIDDEN_BELOW {
            if !members.iter().any(|member| member == crate_name) {
                continue;
            }
            let transitive = below(&graph, crate_name);
            for name in *forbidden {
                assert!(
                    !transitive.contains(*name),
                    "{crate_name} must not depend on {name}, even indirectly"
                );
            }
        }
    }

    /// `resync-protocol` and `resync-log` are sans-IO: they never read a clock, take a lock,
    /// or spawn (callers pass the time and guard the log). Their sources outside tests and
    /// doc comments must not name those.
    #[test]
    fn sans_io_crates_never_read_a_clock_take_a_lock_or_spawn() {
        let forbidden = [
            "Instant::now",
            "SystemTime::now",
            "Mutex",
            "RwLock",
            "thread::spawn",
            "std::thread",
        ];
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        for krate in ["resync-protocol", "resync-log"] {
            let directory = std::path::Path::new(root)
                .join("crates")
                .join(krate)
                .join("src");
            for entry in std::fs::read_dir(&directory).expect("the crate's sources") {
                let path = entry.expect("a source file").path();
                let text = std::fs::read_to_string(&path).expect("utf-8 source");
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                for (number, line) in code.lines().enumerate() {
                    if line.trim_start().starts_with("//") {
                        continue;
                    }
                    for word in forbidden {
                        assert!(
                            !line.contains(word),
                            "{}:{}: {krate} is sans-IO, but names {word}",
                            path.display(),
                            number + 1
                        );
                    }
                }
            }
        }
    }

    /// Every source file under `directory`, recursively.
    fn sources(directory: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(directory).expect("a source folder") {
            let path = entry.expect("a source entry").path();
            if path.is_dir() {
                files.extend(sources(&path));
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                files.push(path);
            }
        }
        files
    }

    #[test]
    fn library_code_builds_no_wire_shape_by_hand() {
        // Every body on the wire is a type of resync-protocol, used by both sides with its
        // round-trip property test (issue 29, defect 4): a `json!` in library code is a
        // shape written a second time, free to drift from the document.
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let mut found = Vec::new();
        for krate in [
            "resync-protocol",
            "resync-log",
            "resync-broker",
            "resync-broker-redis",
            "resync-actix",
            "resync-client",
            "resync-server",
        ] {
            let directory = std::path::Path::new(root)
                .join("crates")
                .join(krate)
                .join("src");
            for path in sources(&directory) {
                let text = std::fs::read_to_string(&path).expect("utf-8 source");
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                for (number, line) in code.lines().enumerate() {
                    if !line.trim_start().starts_with("//") && line.contains("json!(") {
                        found.push(format!("{}:{}", path.display(), number + 1));
                    }
                }
            }
        }
        assert!(
            found.is_empty(),
            "JSON built by hand in library code (use a type of resync_protocol::bodies): {found:?}"
        );
    }

    #[test]
    fn unsafe_code_is_allowed_in_one_audited_place() {
        // The workspace denies `unsafe_code` instead of forbidding it so that one call,
        // glibc's `malloc_trim`, can be made (crates/resync-server/src/memory.rs). Any other
        // `allow(unsafe_code)` is a new audit, decided in docs/decisions.md first.
        let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        let mut found = Vec::new();
        for folder in ["crates", "bench", "xtask", "tests", "examples"] {
            for path in sources(&root.join(folder)) {
                let text = std::fs::read_to_string(&path).expect("utf-8 source");
                if text.contains("allow(unsafe_code)") || text.contains("expect(unsafe_code)") {
                    found.push(
                        path.strip_prefix(root)
                            .unwrap_or(&path)
                            .display()
                            .to_string(),
                    );
                }
            }
        }
        found.retain(|path| !path.ends_with("deps.rs"));
        assert_eq!(found, ["crates/resync-server/src/memory.rs"]);
    }
}
