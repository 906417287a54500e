//! The Grafana dashboard (`dist/grafana/rmem.json`) queries only metrics the daemons export:
//! a donor's and a placement service's live `/metrics`, and the swap daemon's exposition as its
//! own test pins it (`swapclient/tests/fixtures/swap_metrics.prom`).

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

const SECRET: &str = "grafana-dashboard-secret-01234567";

fn get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Sample names in a Prometheus text exposition.
fn names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| l.starts_with("rmem_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every `rmem_*` identifier in the dashboard's queries.
fn queried(dashboard: &serde_json::Value, out: &mut BTreeSet<String>) {
    match dashboard {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if let (true, Some(expr)) = (k == "expr", v.as_str()) {
                    let mut rest = expr;
                    while let Some(i) = rest.find("rmem_") {
                        let tail = &rest[i..];
                        let end = tail
                            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                            .unwrap_or(tail.len());
                        out.insert(tail[..end].to_owned());
                        rest = &tail[end..];
                    }
                } else {
                    queried(v, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| queried(v, out)),
        _ => {}
    }
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("dist/grafana/rmem.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut wanted = BTreeSet::new();
    queried(&dash, &mut wanted);
    assert!(wanted.len() >= 20, "{wanted:?}");

    let mut exported = names(
        &std::fs::read_to_string(root.join("swapclient/tests/fixtures/swap_metrics.prom")).unwrap(),
    );
    let donor = support::donor(
        SECRET,
        &[
            "--size",
            "16M",
            "--slab-size",
            "1M",
            "--admin-listen",
            "127.0.0.1:0",
        ],
    );
    exported.extend(names(&get(
        donor.info["admin"].as_str().unwrap(),
        "/metrics",
    )));

    let (mut place, info) = support::spawn_json(
        Command::new(env!("CARGO_BIN_EXE_rmem"))
            .args(["place", "serve", "--listen", "127.0.0.1:0", "--json"])
            .env("RMEM_SECRET", SECRET),
    );
    let addr = info["listening"].as_str().unwrap().to_owned();
    // One refused placement makes the labelled families (decisions, refusals) appear.
    let refused = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args([
            "place",
            "place",
            "--size",
            "1M",
            "--url",
            &format!("http://{addr}"),
        ])
        .env("RMEM_SECRET", SECRET)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(6));
    exported.extend(names(&get(&addr, "/metrics")));
    let _ = place.kill();
    let _ = place.wait();

    let missing: Vec<&String> = wanted.difference(&exported).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
}
