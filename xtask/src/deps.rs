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
            "resync-broker-disk",
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
                "resync-broker-disk",
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

    /// The modules a crate's source files name through `crate::` (a `mod.rs` and the files
    /// beside it are their folder's module; the crate root is not a module here).
    fn module_imports(
        krate: &str,
    ) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
        let source = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .join("crates")
            .join(krate)
            .join("src");
        let module_of = |path: &std::path::Path| {
            let relative = path.strip_prefix(&source).unwrap_or(path);
            let first = relative
                .components()
                .next()
                .map(|part| part.as_os_str().to_string_lossy().into_owned())
                .unwrap_or_default();
            first.trim_end_matches(".rs").to_owned()
        };
        let files = sources(&source);
        let modules: std::collections::BTreeSet<String> =
            files.iter().map(|path| module_of(path)).collect();
        let mut imports: std::collections::BTreeMap<_, std::collections::BTreeSet<_>> =
            std::collections::BTreeMap::new();
        for path in &files {
            let module = module_of(path);
            if module == "lib" || module == "main" {
                continue;
            }
            let text = std::fs::read_to_string(path).expect("utf-8 source");
            // Code only: a doc link names a module without depending on it.
            let code: String = text
                .split("#[cfg(test)]")
                .next()
                .unwrap_or_default()
                .lines()
                .filter(|line| !line.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let mut named = Vec::new();
            for (at, _) in code.match_indices("crate::") {
                let rest = &code[at + "crate::".len()..];
                if let Some(list) = rest.strip_prefix('{') {
                    let list = &list[..list.find('}').unwrap_or(list.len())];
                    named.extend(list.split(',').map(|part| {
                        part.trim()
                            .split("::")
                            .next()
                            .unwrap_or_default()
                            .to_owned()
                    }));
                } else {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    named.push(name);
                }
            }
            for name in named {
                if name != module && modules.contains(&name) {
                    imports.entry(module.clone()).or_default().insert(name);
                }
            }
        }
        imports
    }

    #[test]
    fn modules_do_not_import_each_other_in_a_circle() {
        // Issue 29: resync-client's connection manager and its transports, and
        // resync-broker-redis's presence and Pub/Sub task, imported each other. A circle
        // makes two modules one in all but name: neither can be read, tested or replaced
        // alone. These crates are kept free of them; resync-actix's transports are next (the
        // session redesign).
        for krate in [
            "resync-protocol",
            "resync-log",
            "resync-broker",
            "resync-broker-redis",
            "resync-client",
            "resync-server",
        ] {
            let imports = module_imports(krate);
            let mut circles = Vec::new();
            for (from, targets) in &imports {
                // A path back from each module it imports closes a circle.
                for target in targets {
                    let mut seen = std::collections::BTreeSet::new();
                    let mut stack = vec![vec![from.clone(), target.clone()]];
                    while let Some(path) = stack.pop() {
                        let last = path.last().expect("a path");
                        if last == from {
                            circles.push(path.join(" -> "));
                            continue;
                        }
                        if !seen.insert(last.clone()) {
                            continue;
                        }
                        for next in imports.get(last).into_iter().flatten() {
                            let mut longer = path.clone();
                            longer.push(next.clone());
                            stack.push(longer);
                        }
                    }
                }
            }
            assert!(circles.is_empty(), "{krate}: {circles:?}");
        }
    }
}
