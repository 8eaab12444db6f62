//! `cargo xtask public-api`: the foreign types each library crate exposes in its public API,
//! checked against the list below (as axum does with `cargo-check-external-types`).
//!
//! A type of another crate in a public signature ties our semver to that crate's: bumping
//! it becomes a breaking change of ours. Each crate may expose only the foreign types listed
//! here; a new one fails CI until it is added on purpose (or hidden), and a listed one that is
//! no longer exposed fails too, so the list stays true.
//!
//! It reads rustdoc's JSON output, which is unstable: the stable toolchain is asked for it
//! with `RUSTC_BOOTSTRAP=1`, for this check only (the JSON's `format_version` is read
//! generically, without a crate tied to one version). Every item of the crate that is `pub`
//! counts (the `unreachable_pub` lint keeps `pub` for what is reachable), with the impls of
//! its public types, except impls the compiler generates (auto traits, blankets).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{cargo, run};

const TARGET_DIR: &str = "target/public-api";

/// Crates whose types may appear anywhere: the standard library's, and ours (the dependency
/// rule of `deps.rs` already says which of ours each crate may use).
fn always_allowed(krate: &str) -> bool {
    matches!(krate, "std" | "core" | "alloc") || krate.starts_with("resync_")
}

/// Foreign types (or whole modules, ending in `::`) each library crate may expose.
const ALLOWED: &[(&str, &[&str])] = &[
    (
        "resync_protocol",
        &[
            // Frames and bodies are serde types (some with impls of their own, which name
            // serde's serializer and deserializer); payloads and poll events are raw JSON.
            "serde_core::ser::Serialize",
            "serde_core::de::Deserialize",
            "serde_core::ser::Serializer",
            "serde_core::de::Deserializer",
            "serde_json::raw::RawValue",
        ],
    ),
    ("resync_log", &[]),
    (
        "resync_broker",
        &[
            // Encoded frames are shared bytes; a subscription is a stream.
            "bytes::bytes::Bytes",
            "futures_core::stream::Stream",
        ],
    ),
    ("resync_broker_redis", &[]),
    (
        "resync_actix",
        &[
            // An actix-web integration: its entry points take actix-web's types.
            "actix_web::",
            "actix_http::",
            "http::status::StatusCode",
            "serde_core::ser::Serialize",
            "serde_core::de::Deserialize",
            "serde_core::ser::Serializer",
            "serde_core::de::Deserializer",
            // A response body streams shared bytes (`MessageBody::poll_next`).
            "bytes::bytes::Bytes",
            // The edge (`resync_actix::edge`) sits under a listener's sockets: it takes the
            // accepted tokio socket and is itself a tokio byte stream, as TLS and actix-http
            // expect; its response body's `Unpin` impl is written by pin-project-lite.
            "tokio::net::tcp::stream::TcpStream",
            "tokio::io::async_read::AsyncRead",
            "tokio::io::read_buf::ReadBuf",
            "tokio::io::async_write::AsyncWrite",
            "pin_project_lite::__private::PinnedFieldsOf",
        ],
    ),
    (
        "resync_client",
        &[
            // A tokio client: its state is a watch, its updates a stream.
            "tokio::sync::watch::Receiver",
            "futures_core::stream::Stream",
        ],
    ),
];

pub(crate) fn check() -> Result<()> {
    let mut failures = Vec::new();
    for (krate, allowed) in ALLOWED {
        let package = krate.replace('_', "-");
        // A target directory of its own: cargo rebuilds whatever was built without
        // `RUSTC_BOOTSTRAP` (and the other builds would then rebuild it all again).
        let mut command = cargo(&[
            "rustdoc",
            "-p",
            &package,
            "--lib",
            "--locked",
            "--target-dir",
            TARGET_DIR,
        ]);
        command
            .args(["--", "-Z", "unstable-options", "--output-format", "json"])
            .env("RUSTC_BOOTSTRAP", "1");
        run(command)?;
        let path = format!("{TARGET_DIR}/doc/{krate}.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let json: Value = serde_json::from_str(&text).with_context(|| format!("parsing {path}"))?;
        let exposed = external_types(&json);
        let mut used = BTreeSet::new();
        for (path, at) in &exposed {
            match allowed.iter().find(|entry| matches(entry, path)) {
                Some(entry) => {
                    used.insert(*entry);
                }
                None => failures.push(format!("{krate} exposes {path} (in {at})")),
            }
        }
        for entry in *allowed {
            if !used.contains(entry) {
                failures.push(format!(
                    "{krate} no longer exposes {entry}: remove it from xtask/src/public_api.rs"
                ));
            }
        }
        eprintln!(
            "xtask: {krate} exposes {} foreign type(s), all listed",
            exposed.len()
        );
    }
    if !failures.is_empty() {
        bail!(
            "the public APIs changed their foreign types:\n  {}",
            failures.join("\n  ")
        );
    }
    Ok(())
}

fn matches(entry: &str, path: &str) -> bool {
    match entry.strip_suffix("::") {
        Some(module) => path == module || path.starts_with(entry),
        None => path == entry,
    }
}

/// Every foreign path in the crate's public items, with an item that shows it.
fn external_types(json: &Value) -> BTreeMap<String, String> {
    let empty = serde_json::Map::new();
    let index = json["index"].as_object().unwrap_or(&empty);
    let paths = json["paths"].as_object().unwrap_or(&empty);
    let crates = json["external_crates"].as_object().unwrap_or(&empty);
    let is_public_local = |id: &Value| {
        let key = id.to_string();
        index
            .get(&key)
            .is_some_and(|item| item["crate_id"] == 0 && item["visibility"] == "public")
    };
    let counted_impl = |implementation: &Value| {
        let generated =
            implementation["is_synthetic"] == true || !implementation["blanket_impl"].is_null();
        let for_id = &implementation["for"]["resolved_path"]["id"];
        !generated && is_public_local(for_id)
    };
    // The items of a public trait, and of a trait's impl for a public type, are public
    // whatever rustdoc says: it marks their visibility `default`, and a trait method that
    // takes or returns a foreign type ties an implementer to that crate as much as a function
    // does (issue 29: the guard skipped them).
    let mut members = BTreeSet::new();
    for item in index.values() {
        if item["crate_id"] != 0 {
            continue;
        }
        let inner = &item["inner"];
        let items = if let Some(definition) = inner.get("trait") {
            (item["visibility"] == "public").then_some(&definition["items"])
        } else if let Some(implementation) = inner.get("impl") {
            (!implementation["trait"].is_null() && counted_impl(implementation))
                .then_some(&implementation["items"])
        } else {
            None
        };
        for id in items.and_then(Value::as_array).into_iter().flatten() {
            members.insert(id.to_string());
        }
    }
    let mut found = BTreeMap::new();
    for (id, item) in index {
        if item["crate_id"] != 0 {
            continue;
        }
        let inner = &item["inner"];
        let counts = if let Some(implementation) = inner.get("impl") {
            counted_impl(implementation)
        } else {
            item["visibility"] == "public" || members.contains(id)
        };
        if !counts {
            continue;
        }
        let name = item["name"].as_str().unwrap_or("an impl").to_owned();
        let mut ids = Vec::new();
        collect_path_ids(inner, &mut ids);
        for id in ids {
            let Some(summary) = paths.get(&id.to_string()) else {
                continue;
            };
            let Some(krate) = summary["crate_id"]
                .as_u64()
                .filter(|krate| *krate != 0)
                .and_then(|krate| crates.get(&krate.to_string()))
                .and_then(|krate| krate["name"].as_str())
            else {
                continue;
            };
            if always_allowed(krate) {
                continue;
            }
            let path = summary["path"]
                .as_array()
                .map(|parts| {
                    parts
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("::")
                })
                .unwrap_or_default();
            found.entry(path).or_insert_with(|| name.clone());
        }
    }
    found
}

/// The ids of every path (a type, a trait, a bound) named inside `value`.
fn collect_path_ids(value: &Value, ids: &mut Vec<u64>) {
    match value {
        Value::Object(map) => {
            if let (Some(Value::String(_)), Some(id)) = (map.get("path"), map.get("id"))
                && let Some(id) = id.as_u64()
            {
                ids.push(id);
            }
            for (key, child) in map {
                // An impl's or a module's items are items of their own, counted by their own
                // visibility.
                if key == "items" || key == "impls" {
                    continue;
                }
                collect_path_ids(child, ids);
            }
        }
        Value::Array(values) => {
            for child in values {
                collect_path_ids(child, ids);
            }
        }
        _ => {}
    }
}
