//! The `inkspect` binary: the command line, or the desktop app when no command is given.

use clap::Parser;

fn main() -> std::process::ExitCode {
    tune_allocator();
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

/// Keeps glibc from returning the large tensor buffers of every training step to the OS only to
/// map them again on the next (page faults and zeroing cost about 8 % of a training step).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
