//! `rmem`: lend and borrow memory across hosts over one-sided RDMA.
//!
//! This binary is a thin front-end; the work lives in the library crates.

mod cmd;
mod exit;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cmd::Cli::parse();
    exit::init_logging(cli.verbose);
    match cmd::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rmem: {}", exit::chain(&*e.error));
            std::process::ExitCode::from(e.code as u8)
        }
    }
}
