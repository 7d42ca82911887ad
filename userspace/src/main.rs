use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = sluice::cli::Cli::parse();
    match sluice::cli::main(cli) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(error) => {
            eprintln!("sluice: error: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}
