//! The browser client (JavaScript) keeps the Rust contract: its close-code table gives the
//! same advice as `resync_protocol::CloseCode::advice` for every code a server can send,
//! read by running the real module under Node.js.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::process::Command;

use resync_protocol::{CloseCode, ReconnectAdvice};

/// The browser client's word for each advice (`closeAdvice` in clients/browser/src/resync.js).
fn browser_word(advice: ReconnectAdvice) -> &'static str {
    match advice {
        ReconnectAdvice::Stop => "stop",
        ReconnectAdvice::Backoff {
            drop_pending_message: true,
        } => "backoff-drop-message",
        ReconnectAdvice::Backoff {
            drop_pending_message: false,
        } => "backoff",
        ReconnectAdvice::Soon => "soon",
        ReconnectAdvice::RefreshTokenThenReconnect => "refresh-token",
    }
}

#[test]
fn the_browser_close_code_table_is_the_rust_table() {
    let module = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../clients/browser/src/resync.js")
        .canonicalize()
        .unwrap();
    let script = format!(
        "import {{ closeAdvice }} from {:?};\n\
         const out = [];\n\
         for (let code = 0; code < 5000; code++) out.push(closeAdvice(code));\n\
         console.log(JSON.stringify(out));",
        format!("file://{}", module.display())
    );
    let output = Command::new("node")
        .args(["--input-type=module", "-e", &script])
        .output()
        .expect("Node.js is installed (cargo xtask ci installs it)");
    assert!(
        output.status.success(),
        "node failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let browser: Vec<String> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(browser.len(), 5000);
    let mut differences = Vec::new();
    for (code, word) in browser.iter().enumerate() {
        let rust = browser_word(CloseCode(code as u16).advice());
        if word != rust {
            differences.push(format!("{code}: browser {word}, rust {rust}"));
        }
    }
    assert!(differences.is_empty(), "the tables differ: {differences:?}");
    // Every code the server sends is in the range compared.
    assert!(
        resync_protocol::close::ALL_CLOSE_CODES
            .iter()
            .all(|code| code.0 < 5000)
    );
}
