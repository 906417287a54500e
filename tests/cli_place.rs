//! `rmem place`: a real service process, donors registering through `rmem server --placement`,
//! and the command-line queries with their exit codes.

mod support;

use std::process::{Child, Command};
use std::time::Duration;

use support::{donor, spawn_json, wait_until};

const SECRET: &str = "cli-place-test-secret-0123456789";

struct Service {
    child: Child,
    url: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `rmem place serve` on a free port with 1 MiB slabs.
fn service() -> Service {
    let (child, v) = spawn_json(
        Command::new(env!("CARGO_BIN_EXE_rmem"))
            .args([
                "place",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--slab-size",
                "1M",
                "--json",
            ])
            .env("RMEM_SECRET", SECRET),
    );
    Service {
        child,
        url: format!("http://{}", v["listening"].as_str().unwrap()),
    }
}

/// `rmem place ARGS --url URL`: (exit code, stdout, stderr).
fn place(url: &str, secret: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .arg("place")
        .args(args)
        .args(["--url", url])
        .env("RMEM_SECRET", secret)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn donors(url: &str) -> serde_json::Value {
    let (code, out, err) = place(url, SECRET, &["donors", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn donors_register_through_the_server_and_placements_spread_over_their_domains() {
    let svc = service();
    // 16 slabs each, a long lease so no heartbeat resets a grant during the test.
    let registered = |extra: &[&str]| {
        let mut args = vec!["--size", "16M", "--slab-size", "1M", "--no-admin"];
        args.extend(["--placement", &svc.url, "--placement-lease", "300"]);
        args.extend(extra);
        donor(SECRET, &args)
    };
    let _a = registered(&["--domain", "rack-a", "--link-rate", "10G"]);
    let _b = registered(&["--domain", "rack-b"]);
    wait_until("both donors registered", Duration::from_secs(20), || {
        donors(&svc.url)["donors"].as_array().map_or(0, |d| d.len()) == 2
    });
    let d = donors(&svc.url);
    let listed: Vec<&serde_json::Value> = d["donors"].as_array().unwrap().iter().collect();
    assert!(listed
        .iter()
        .all(|x| x["total_slabs"] == 16 && x["free_slabs"] == 16));

    let (code, out, err) = place(
        &svc.url,
        SECRET,
        &[
            "place",
            "--size",
            "6M",
            "--replicas",
            "2",
            "--client",
            "b1",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    let chunks = p["chunks"].as_array().unwrap();
    assert_eq!(chunks.len(), 6);
    for c in chunks {
        assert_ne!(c[0]["domain"], c[1]["domain"]);
    }
    // The grant shows at once; the donors' next heartbeats (their slabs were not allocated,
    // this was only a question) give the slabs back.
    let free: u64 = donors(&svc.url)["donors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["free_slabs"].as_u64().unwrap())
        .sum();
    assert_eq!(free, 32 - 12);

    // Refusals: more than free (6), a wrong secret (2); the human form says why.
    let (code, _, err) = place(&svc.url, SECRET, &["place", "--size", "64M"]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("full"), "{err}");
    let (code, _, err) = place(
        &svc.url,
        "another-secret-entirely-0000",
        &["place", "--size", "1M"],
    );
    assert_eq!(code, 2, "{err}");
    // An unreachable service (5).
    let (code, _, _) = place("http://127.0.0.1:1", SECRET, &["donors"]);
    assert_eq!(code, 5);
}

#[test]
fn a_reservation_that_cannot_finish_names_the_deadline_that_would() {
    let svc = service();
    let _a = donor(
        SECRET,
        &[
            "--size",
            "4M",
            "--slab-size",
            "1M",
            "--no-admin",
            "--placement",
            &svc.url,
            "--link-rate",
            "100M",
        ],
    );
    wait_until("donor registered", Duration::from_secs(20), || {
        donors(&svc.url)["donors"].as_array().map_or(0, |d| d.len()) == 1
    });
    let id = donors(&svc.url)["donors"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // 100 MiB from the donor to b1 within `deadline` seconds, on its 100 Mbit/s link.
    let reserve = |deadline: &str, extra: &[&str]| {
        let mut args = vec!["reserve", "--from", &id, "--to", "b1", "--size", "100M"];
        args.extend(["--deadline", deadline]);
        args.extend(extra);
        place(&svc.url, SECRET, &args)
    };
    // 100 Mbit/s: 125 MB in 10 s.
    let (code, out, err) = reserve("20", &["--json"]);
    assert_eq!(code, 0, "{err}");
    let g: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rate = g["rate"].as_f64().unwrap();
    assert!(rate <= 12.5e6 * 1.0001 && rate > 12.5e6 * 0.99, "{g}");
    let (code, _, err) = reserve("5", &[]);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("earliest deadline that fits"), "{err}");
}

#[test]
fn the_simulation_compares_strategies_from_the_command_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args([
            "place",
            "sim",
            "--donors",
            "500",
            "--racks",
            "10",
            "--decisions",
            "20000",
        ])
        .args([
            "--world",
            "homogeneous",
            "--view",
            "stale",
            "--replicas",
            "1",
        ])
        .args(["--strategy", "least-loaded,weighted-d2", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    // On a stale view the exact least-loaded choice herds; sampling does not.
    assert!(
        rows[0]["max_over_mean"].as_f64().unwrap() > 1.5,
        "{}",
        rows[0]
    );
    assert!(
        rows[1]["max_over_mean"].as_f64().unwrap() < 1.3,
        "{}",
        rows[1]
    );
}
