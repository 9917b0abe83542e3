//! The `inkspect` binary: the command line, or the desktop app when no command is given.

use clap::Parser;

fn main() -> std::process::ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or("warn,inkspect=info,wgpu_hal=off,wgpu_core=error,naga=off"),
    )
    .init();
    let cli = inkspect::cli::Cli::parse();
    match inkspect::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
