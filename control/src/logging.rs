//! Structured logs: human-readable on a terminal, JSON lines otherwise.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init(level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    // openraft is chatty at info; keep it at warn unless asked explicitly.
    let filter = if level.contains("openraft") {
        filter
    } else {
        filter.add_directive("openraft=warn".parse().expect("static directive"))
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().init();
    }
}
