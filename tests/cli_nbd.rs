//! The donor's NBD export through real NBD clients (libnbd's nbdinfo and nbdcopy, qemu-io).
//! scripts/test.sh installs them; a missing tool fails the test rather than skipping it.

use std::process::Command;

mod support;

/// A donor with these NBD exports (NAME=SIZE), and its NBD address.
struct Donor {
    _process: support::Donor,
    nbd: String,
}

fn donor(exports: &[&str]) -> Donor {
    let mut args = vec![
        "--size",
        "16M",
        "--slab-size",
        "1M",
        "--no-admin",
        "--nbd-listen",
        "127.0.0.1:0",
    ];
    for e in exports {
        args.extend(["--export", e]);
    }
    let d = support::donor("nbd test secret, long enough", &args);
    Donor {
        nbd: d.addr("nbd").to_string(),
        _process: d,
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd} is needed for this test (scripts/test.sh installs it): {e}")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{cmd} {args:?} failed: {text}");
    text
}

#[test]
fn nbdinfo_lists_exports_with_size_and_block_sizes() {
    let d = donor(&["swap0=5M", "small=4096"]);
    let list = run("nbdinfo", &["--list", &format!("nbd://{}", d.nbd)]);
    assert!(
        list.contains("export=\"swap0\"") && list.contains("export=\"small\""),
        "{list}"
    );
    let info = run("nbdinfo", &["--json", &format!("nbd://{}/swap0", d.nbd)]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 5 << 20);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["can_trim"], true);
    assert_eq!(e["can_zero"], true);
    let o = Command::new("nbdinfo")
        .arg(format!("nbd://{}/nosuch", d.nbd))
        .output()
        .unwrap();
    assert!(!o.status.success(), "an unknown export was served");
}

#[test]
fn nbdcopy_round_trip_is_exact() {
    let d = donor(&["disk=3M"]);
    let dir = std::env::temp_dir().join(format!("rmem-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, dst) = (dir.join("in.img"), dir.join("out.img"));
    let data: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let uri = format!("nbd://{}/disk", d.nbd);
    run("nbdcopy", &[src.to_str().unwrap(), &uri]);
    run("nbdcopy", &[&uri, dst.to_str().unwrap()]);
    assert!(
        std::fs::read(&dst).unwrap() == data,
        "data read back differs"
    );
}

#[test]
fn qemu_io_patterns_zeroes_and_bounds() {
    let d = donor(&["vm=2M"]);
    let uri = format!("nbd://{}/vm", d.nbd);
    // qemu-io verifies -P patterns itself and reports a mismatch.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1048000 8192",
            "-c",
            "read -P 0x5a 1048000 8192",
            "-c",
            "write -z 1049000 4096",
            "-c",
            "read -P 0 1049000 4096",
            "-c",
            "read -P 0x5a 1048000 1000",
            "-c",
            "discard 0 4096",
            "-c",
            "read -P 0 0 4096",
            "-c",
            "flush",
            &uri,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 4, "{out}");
    // Past the end: qemu refuses or the export answers with an error; no data comes back.
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 2093056 8192", &uri])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !text.contains("read 8192/8192"),
        "a read past the end succeeded: {text}"
    );
}
