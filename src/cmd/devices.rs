//! `rmem devices`: what RDMA hardware this host has.

use clap::Args;

use crate::exit::Failed;

#[derive(Args, Debug)]
pub struct DevicesArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[cfg(feature = "verbs")]
pub fn run(a: DevicesArgs) -> Result<(), Failed> {
    let devs = rmem_transport::verbs::devices()?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&devs).expect("devices serialise")
        );
        return Ok(());
    }
    if devs.is_empty() {
        println!("no RDMA devices (load a NIC driver, or set up Soft-RoCE: soft-roce/rxe.sh add <netdev>)");
    }
    for d in &devs {
        println!("{d}");
    }
    Ok(())
}

#[cfg(not(feature = "verbs"))]
pub fn run(_: DevicesArgs) -> Result<(), Failed> {
    Err(rmem_transport::Error::ProviderUnavailable("verbs").into())
}
