//! The `rmem` binary end to end: the demo, perf, conformance, memcheck, usage errors and exit
//! codes.

use std::process::{Command, Output};

fn rmem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args(args)
        .output()
        .expect("run rmem")
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

#[test]
fn demo_moves_and_verifies_data() {
    let o = rmem(&["demo", "--size", "8M", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = json(&o);
    assert_eq!(v["verified"], true);
    assert_eq!(v["fetch_add_final"], 3000);
    assert_eq!(v["bytes"], 8 << 20);
    assert!(v["read_4k_p50_us"].as_f64().unwrap() > 0.0);
    assert!(v["write_64k_mib_per_sec"].as_f64().unwrap() > 0.0);
    // 8 WRITEs + 8 READs + 1000 atomics + the perf runs, all served on the donor's target side.
    assert!(v["donor_requests_served"].as_u64().unwrap() > 1016);
    assert_eq!(v["donor_access_errors"], 0);
}

#[test]
fn perf_loopback_reports_every_requested_size() {
    let o = rmem(&[
        "perf", "loopback", "--op", "write", "--bw", "-s", "4K", "-s", "64K", "-n", "500",
        "--warmup", "50", "--verify", "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = json(&o);
    assert_eq!(v["verified"], true);
    let rows = v["results"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["bytes"], 4096);
    assert_eq!(rows[1]["bytes"], 65536);
    for r in rows {
        assert!(r["bw"]["bytes_per_sec"].as_f64().unwrap() > 0.0);
        assert_eq!(r["iters"], 500);
    }
    let o = rmem(&[
        "perf", "loopback", "--op", "atomic", "-n", "300", "--warmup", "10",
    ]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("t_typ[us]") && text.contains("       8 "),
        "{text}"
    );
}

#[test]
fn conformance_command_runs_cases_and_rejects_unknown_ones() {
    let o = rmem(&[
        "conformance",
        "--case",
        "atomics",
        "--case",
        "send_recv",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let v = json(&o);
    let cases = v.as_array().unwrap();
    assert_eq!(cases.len(), 2);
    assert!(cases.iter().all(|c| c["passed"] == true));
    let o = rmem(&["conformance", "--case", "no_such_case"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn memcheck_reports_fill_and_verify_separately() {
    let o = rmem(&["memcheck", "--size", "4M", "--passes", "2", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = json(&o);
    assert_eq!(v["pages"], 1024);
    assert_eq!(v["bad_pages"], 0);
    for key in ["mib_per_sec", "fill_mib_per_sec", "verify_mib_per_sec"] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}: {v}");
    }
    let phases = v["fill_seconds"].as_f64().unwrap() + v["verify_seconds"].as_f64().unwrap();
    assert!(phases <= v["seconds"].as_f64().unwrap(), "{v}");
}

#[test]
fn usage_errors_exit_2_and_explain() {
    let o = rmem(&["perf", "client", "127.0.0.1:1", "--size", "12Q"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("size suffix"));
    let o = rmem(&["demo", "--size", "7"]);
    assert_eq!(o.status.code(), Some(2));
    let o = rmem(&["--help"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("Exit status"));
}

#[test]
fn unreachable_peer_exits_5() {
    // Bind and close a port so nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = rmem(&["perf", "client", &format!("127.0.0.1:{port}")]);
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("connect"));
}

#[test]
fn a_demo_larger_than_the_host_says_how_much_memory_there_is() {
    // 200000 GiB: more than any host has, and more than a 47-bit address space.
    let o = rmem(&["demo", "--size", "200000G"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("asked for 204800000 MiB"), "{err}");
    assert!(err.contains("MemAvailable"), "{err}");
}

#[test]
fn perf_refuses_zero_byte_messages_before_connecting() {
    for args in [
        &["perf", "client", "127.0.0.1:1", "-s", "0"][..],
        &["perf", "loopback", "--size", "4K", "--size", "0"],
    ] {
        let o = rmem(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("at least 1 byte"), "{args:?}: {err}");
    }
}
