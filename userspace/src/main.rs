use clap::Parser as _;

fn main() -> std::process::ExitCode {
    // The first process of a `sluice run` sandbox (see sandbox::init).
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if sluice::sandbox::init::is_init(args.first()) {
        return std::process::ExitCode::from(sluice::sandbox::init::main(&args[1..]));
    }
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
