use clap::Parser as _;

fn main() -> std::process::ExitCode {
    // SAFETY: the first thing in main, before any thread (the tokio runtime
    // starts in cli::main): secrets leave the environment single-threaded.
    unsafe { sluice::credentials::take_env_secrets() };
    let cli = sluice::cli::Cli::parse();
    match sluice::cli::main(cli) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(error) => {
            eprintln!("sluice: error: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}
