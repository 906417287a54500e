//! `rmem server` as a process: configuration, a client borrowing from it, graceful shutdown.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use rmem_swapclient::{Client, ClientConfig};

const SECRET: &str = "cli test secret, long enough";

#[test]
fn refuses_to_start_without_a_secret_or_with_a_bad_config() {
    let o = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--size",
            "4M",
            "--slab-size",
            "1M",
        ])
        .env_remove("RMEM_SECRET")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("secret"));

    let dir = std::env::temp_dir().join(format!("rmem-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "size = \"4M\"\nslab_sise = \"1M\"\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args(["server", "--config", cfg.to_str().unwrap()])
        .env("RMEM_SECRET", SECRET)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    // One line: file, line and column, what is wrong.
    assert!(
        err.contains("bad.toml:2:1: unknown field `slab_sise`"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

mod support;

use support::Donor;

/// `rmem server` on loopback with 4 slabs of 1 MiB and an admin endpoint; its start-up line.
fn donor() -> (Donor, serde_json::Value) {
    let d = support::donor(
        SECRET,
        &[
            "--size",
            "4M",
            "--slab-size",
            "1M",
            "--admin-listen",
            "127.0.0.1:0",
        ],
    );
    let v = d.info.clone();
    (d, v)
}

#[test]
fn a_signed_admin_request_is_carried_out_once() {
    let (_d, v) = donor();
    let admin: std::net::SocketAddr = v["admin"].as_str().unwrap().parse().unwrap();
    let body = br#"{"slabs": 1}"#;
    let auth = rmem_memserver::admin_authorization(SECRET.as_bytes(), "POST", "/shrink", body);
    let first = http_post(admin, "/shrink", &auth, body);
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    for _ in 0..3 {
        let again = http_post(admin, "/shrink", &auth, body);
        assert!(again.starts_with("HTTP/1.1 409"), "{again}");
        assert!(again.contains("replayed"), "{again}");
    }
    let status = http_get(admin, "/status");
    let st: serde_json::Value =
        serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(st["slabs_retired"], 1, "{st}");
    // A fresh signature for the same request is a new request.
    let auth = rmem_memserver::admin_authorization(SECRET.as_bytes(), "POST", "/shrink", body);
    assert!(http_post(admin, "/shrink", &auth, body).starts_with("HTTP/1.1 200"));
}

#[test]
fn shrink_by_nothing_is_a_usage_error_found_before_any_request() {
    // Nothing listens at the admin address: a request would fail with another status.
    let o = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args(["server", "shrink", "--by", "0", "--admin", "127.0.0.1:1"])
        .env("RMEM_SECRET", SECRET)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("more than 0"),
        "{o:?}"
    );
}

#[test]
fn a_wrong_secret_is_reported_once_with_what_to_check() {
    let (_d, v) = donor();
    let o = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args(["perf", "alloc", v["listening"].as_str().unwrap(), "-n", "1"])
        .env("RMEM_SECRET", "not the donor's secret at all")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.matches("authentication failed").count(), 1, "{err}");
    assert!(err.contains("same shared secret"), "{err}");
}

/// A field of /proc/meminfo.
fn meminfo(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/meminfo"))
}

#[test]
fn memory_the_host_cannot_give_is_explained() {
    let server = |size: &str, huge: &str| {
        Command::new(env!("CARGO_BIN_EXE_rmem"))
            .args(["server", "--listen", "127.0.0.1:0", "--no-admin", "--size"])
            .args([size, "--slab-size", "2M", "--hugepages", huge])
            .env("RMEM_SECRET", SECRET)
            .output()
            .unwrap()
    };
    let o = server("1000T", "never");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("MemAvailable"), "{err}");
    assert!(err.contains("asked for 1048576000 MiB"), "{err}");
    // One huge page more than the host has free, whatever it has reserved.
    let free = meminfo("HugePages_Free");
    let o = server(&format!("{}M", (free + 1) * 2), "require");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("/proc/sys/vm/nr_hugepages"), "{err}");
    assert!(
        err.contains(&format!("{free} free (HugePages_Free")),
        "{err}"
    );
}

#[test]
fn serves_a_client_from_a_config_file_and_shuts_down_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("rmem-srv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cfg, secret) = (dir.join("server.toml"), dir.join("secret"));
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nsize = \"4M\"\nslab_size = \"1M\"\nhugepages = \"never\"\nsecret_file = {:?}\n[reclaim]\ngrace_secs = 1\nshutdown_grace_secs = 20\npressure = false\n",
            secret.to_str().unwrap()
        ),
    )
    .unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args([
            "server",
            "--config",
            cfg.to_str().unwrap(),
            "--lease-secs",
            "5",
            "--json",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).expect("start-up line");
    assert_eq!(v["slabs"], 4);
    let addr = v["listening"].as_str().unwrap().parse().unwrap();
    let admin: std::net::SocketAddr = v["admin"].as_str().unwrap().parse().unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = std::sync::Arc::new(
            Client::connect(ClientConfig::new(addr, SECRET.as_bytes().to_vec()))
                .await
                .unwrap(),
        );
        let s = c.alloc(4).await.unwrap();
        let c2 = c.clone();
        let back = tokio::task::spawn_blocking(move || {
            c2.write(&s[3], 4096, b"lent across processes").unwrap();
            let mut b = [0u8; 21];
            c2.read(&s[3], 4096, &mut b).unwrap();
            b
        })
        .await
        .unwrap();
        assert_eq!(&back, b"lent across processes");

        let metrics = http_get(admin, "/metrics");
        assert!(metrics.contains("rmem_donor_slabs 4\n"), "{metrics}");
        assert!(metrics.contains("rmem_donor_slabs_free 0\n"), "{metrics}");
        assert!(
            metrics.contains("rmem_donor_slabs_allocated_total 4\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("# TYPE rmem_target_requests_total counter"),
            "{metrics}"
        );
        let status = http_get(admin, "/status");
        let body: serde_json::Value =
            serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["sessions"][0]["slabs"], 4);
        assert_eq!(body["sessions"][0]["client"], "rmem-client");
        assert!(body["transport"]["requests"].as_u64().unwrap() >= 2);

        // `rmem server shrink`: signed with the secret; the client is told.
        let mut notices = c.notices().unwrap();
        let shrink = |secret: &std::path::Path| {
            Command::new(env!("CARGO_BIN_EXE_rmem"))
                .args(["server", "shrink", "--by", "1M", "--json", "--admin"])
                .arg(admin.to_string())
                .arg("--secret-file")
                .arg(secret)
                .output()
                .unwrap()
        };
        let wrong = dir.join("wrong");
        std::fs::write(&wrong, "not the secret, but long enough").unwrap();
        let out = shrink(&wrong);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("signature"),
            "{out:?}"
        );
        // A signed request with a malformed or zero amount: 400, nothing taken.
        for body in [&b"{\"pages\": 1}"[..], b"{\"slabs\": 0}", b"not json"] {
            let auth =
                rmem_memserver::admin_authorization(SECRET.as_bytes(), "POST", "/shrink", body);
            let reply = http_post(admin, "/shrink", &auth, body);
            assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
        }
        assert_eq!(c.stats().await.unwrap().slabs_retired, 0);
        let out = shrink(&secret);
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["report"]["reclaiming"], 1, "{v}");
        match tokio::time::timeout(Duration::from_secs(5), notices.recv()).await {
            Ok(Some(rmem_swapclient::Notice::Reclaim { slabs, .. })) => assert_eq!(slabs.len(), 1),
            other => panic!("expected a reclaim notice, got {other:?}"),
        }
        // The slab it did not give back is taken at the reclaim deadline (grace_secs = 1).
        support::wait_until_async(
            "the slab taken at the reclaim deadline",
            Duration::from_secs(10),
            || {
                let c = c.clone();
                async move { c.stats().await.unwrap().slabs_retired == 1 }
            },
        )
        .await;

        // SIGTERM: the donor tells the client, which gives its slabs back, and exits cleanly
        // without waiting out the grace period.
        let pid = server.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        match tokio::time::timeout(Duration::from_secs(5), notices.recv()).await {
            Ok(Some(rmem_swapclient::Notice::Closing { reason, .. })) => {
                assert!(reason.contains("shutting down"), "{reason}")
            }
            other => panic!("expected a closing notice, got {other:?}"),
        }
        let left: Vec<u32> = c.held().iter().map(|g| g.slab).collect();
        c.free(&left).await.unwrap();
        let t0 = std::time::Instant::now();
        let status = tokio::task::spawn_blocking(move || server.wait().unwrap())
            .await
            .unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "waited out the grace period"
        );
        eprintln!("server exited {:?} after the last free", t0.elapsed());
        assert!(status.success(), "{status:?}");
        // Its process is gone: our end of the control connection sees that within moments.
        support::wait_until_async(
            "the donor stops answering after shutting down",
            Duration::from_secs(5),
            || {
                let c = c.clone();
                async move { c.stats().await.is_err() }
            },
        )
        .await;
    });
}

/// A bare HTTP/1.1 GET (no client library needed for two endpoints).
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: rmem\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// A bare HTTP/1.1 POST; returns the whole reply.
fn http_post(addr: std::net::SocketAddr, path: &str, auth: &str, body: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: rmem\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
