// Tests may unwrap; shipped code handles every error (issue 10).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
use clap::Parser;

fn main() {
    let cli = bhatti::cli::Cli::parse();
    match bhatti::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
