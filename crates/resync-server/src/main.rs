//! The resync reference server binary: `cargo run -p resync-server`.

use anyhow::Result;
use resync_server::{Args, LogFormat, Settings};
use tracing_subscriber::EnvFilter;

fn main() -> Result<()> {
    let settings = Settings::load(Args::from_env())?;
    init_logging(settings.log_format);
    actix_web::rt::System::new().block_on(resync_server::run(settings))
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("RESYNC_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr; stdout carries only the "listening on" lines, for scripts.
    // Colour only for a terminal: escape codes in a log file or a collector are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
