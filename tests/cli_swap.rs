//! `rmem swap` on a host: what can be checked without the nbd module (the VM harness runs the
//! real device: soft-roce/vm/run.sh swap).

use std::process::Command;

fn rmem(args: &[&str], run_dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args(args)
        .arg("--run-dir")
        .arg(run_dir)
        .env("RMEM_SECRET", "a shared secret for tests")
        .output()
        .unwrap()
}

/// `rmem swap up --size 64M --no-mlock` plus `extra`.
fn up(extra: &[&str], run_dir: &std::path::Path) -> std::process::Output {
    let mut args = vec!["swap", "up", "--size", "64M", "--no-mlock"];
    args.extend_from_slice(extra);
    rmem(&args, run_dir)
}

/// Exit 2, and stderr says `what`.
fn assert_usage(out: &std::process::Output, what: &str) {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(what),
        "{out:?}"
    );
}

#[test]
fn swap_commands_fail_clearly_and_with_their_exit_codes() {
    let dir = std::env::temp_dir().join(format!("rmem-swap-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let out = rmem(&["swap", "status", "--json"], &dir);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");

    let out = rmem(&["swap", "down"], &dir);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no rmem swap device"));

    // Two replicas on one failure domain: a usage error, found before anything is borrowed.
    let out = up(
        &[
            "--replicas",
            "2",
            "--donor",
            "127.0.0.1:1",
            "--donor",
            "127.0.0.1:2",
        ],
        &dir,
    );
    assert_usage(&out, "failure domains");

    // A reserve that is not a size: a usage error naming what is expected.
    let out = up(&["--min-free", "lots", "--donor", "127.0.0.1:1"], &dir);
    assert_usage(&out, "expected auto, keep or a size");

    // Nobody listening: the peer exit code.
    let out = up(&["--donor", "127.0.0.1:1"], &dir);
    assert_eq!(out.status.code(), Some(5), "{out:?}");

    // ublk asked for where the kernel has none: a usage error naming the module.
    if !std::path::Path::new("/dev/ublk-control").exists() {
        let out = up(&["--backend", "ublk", "--donor", "127.0.0.1:1"], &dir);
        assert_usage(&out, "modprobe ublk_drv");
    }
    let out = up(&["--backend", "floppy", "--donor", "127.0.0.1:1"], &dir);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
