use clap::Parser;
use starcite::config::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Serve(config) => starcite::server::run(config),
    };
    if let Err(message) = result {
        tracing::error!("{message}");
        eprintln!("starcite: {message}");
        std::process::exit(1);
    }
}

/// `RUST_LOG` sets the filter; by default info, without glommio's harmless start-up
/// complaint about iopoll probing on virtual disks.
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,glommio::reactor=off,glommio=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
