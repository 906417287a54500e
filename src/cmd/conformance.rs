//! `rmem conformance`: the transport conformance suite against a live provider.

use std::net::SocketAddr;
use std::time::Instant;

use clap::Args;
use rmem_transport::conformance::{Setup, CASES};

use super::ProviderArgs;
use crate::exit::{Code, Failed};

#[derive(Args, Debug)]
pub struct ConformanceArgs {
    #[command(flatten)]
    provider: ProviderArgs,
    /// Address the suite's listeners bind (an address carried by the RDMA device for verbs).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Run only the named case (repeatable); `--list` shows them.
    #[arg(long = "case")]
    cases: Vec<String>,
    /// List the cases and exit.
    #[arg(long)]
    list: bool,
    /// Print results as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Outcome {
    case: &'static str,
    passed: bool,
    seconds: f64,
    message: Option<String>,
}

pub fn run(a: ConformanceArgs) -> Result<(), Failed> {
    if a.list {
        for (name, _) in CASES {
            println!("{name}");
        }
        return Ok(());
    }
    for c in &a.cases {
        if !CASES.iter().any(|(n, _)| n == c) {
            return Err(Failed::new(
                Code::Usage,
                format!("no conformance case named {c:?}"),
            ));
        }
    }
    let setup = Setup {
        open: a.provider.open_options(),
        listen: a.listen,
    };
    // Fail early and clearly when the provider cannot be opened at all.
    rmem_transport::open(&setup.open)?;
    // Case failures are assertion panics: report them as results, not as crashes.
    std::panic::set_hook(Box::new(|_| {}));
    let mut outcomes = Vec::new();
    for (name, case) in CASES {
        if !a.cases.is_empty() && !a.cases.iter().any(|c| c == name) {
            continue;
        }
        let t = Instant::now();
        let r = std::panic::catch_unwind(|| case(&setup));
        let message = r.err().map(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "case panicked".into())
        });
        let o = Outcome {
            case: name,
            passed: message.is_none(),
            seconds: t.elapsed().as_secs_f64(),
            message,
        };
        if !a.json {
            match &o.message {
                None => println!("PASS {:<30} {:>7.2} s", o.case, o.seconds),
                Some(m) => println!("FAIL {:<30} {:>7.2} s  {m}", o.case, o.seconds),
            }
        }
        outcomes.push(o);
    }
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcomes).expect("outcomes serialise")
        );
    } else {
        println!("{} passed, {} failed", outcomes.len() - failed, failed);
    }
    if failed > 0 {
        return Err(Failed::new(
            Code::Verify,
            format!("{failed} conformance case(s) failed"),
        ));
    }
    Ok(())
}
