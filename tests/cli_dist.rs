//! What the package ships besides the binary: man pages and completions generated from the
//! clap definitions (checked against `--help`), systemd units (`systemd-analyze verify`), and
//! example configuration files (each parsed by the command that reads it).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

fn rmem(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rmem"))
        .args(args)
        .output()
        .unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rmem-dist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The subcommands `rmem [path] --help` lists.
fn subcommands(path: &[&str]) -> Vec<String> {
    let mut args = path.to_vec();
    args.push("--help");
    let out = String::from_utf8(rmem(&args).stdout).unwrap();
    out.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_subcommand_has_a_man_page_with_its_options() {
    let dir = scratch("man");
    let out = rmem(&["man", "--dir", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let top = subcommands(&[]);
    assert!(top.len() >= 10, "{top:?}");
    for sub in &top {
        let page = dir.join(format!("rmem-{sub}.1"));
        assert!(page.exists(), "no man page for rmem {sub}");
        for nested in subcommands(&[sub]) {
            assert!(
                dir.join(format!("rmem-{sub}-{nested}.1")).exists(),
                "no man page for rmem {sub} {nested}"
            );
        }
    }
    // A page carries the options --help shows (man escapes dashes).
    let up = std::fs::read_to_string(dir.join("rmem-swap-up.1")).unwrap();
    for opt in ["placement", "replicas", "config", "lanes"] {
        assert!(
            up.contains(&format!("\\-\\-{opt}")),
            "rmem-swap-up.1 lacks --{opt}"
        );
    }
    assert!(std::fs::read_to_string(dir.join("rmem.1"))
        .unwrap()
        .contains("rmem\\-place"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn completions_cover_every_subcommand_for_each_shell() {
    let top = subcommands(&[]);
    for shell in ["bash", "zsh", "fish"] {
        let out = rmem(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8(out.stdout).unwrap();
        for sub in &top {
            assert!(
                text.contains(sub.as_str()),
                "{shell} completions lack {sub}"
            );
        }
        assert!(text.contains("placement"), "{shell}: no --placement");
    }
    assert!(!rmem(&["completions", "tcsh"]).status.success());
}

/// Each unit with its ExecStart pointed at this build's binary (the package installs
/// /usr/bin/rmem), verified by systemd itself.
#[test]
fn the_systemd_units_verify() {
    let dir = scratch("units");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/systemd");
    let mut names = Vec::new();
    for e in std::fs::read_dir(&units).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/bin/rmem", env!("CARGO_BIN_EXE_rmem"));
        let name = path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .replace("@.", "@test.");
        std::fs::write(dir.join(&name), text).unwrap();
        names.push(name);
    }
    names.sort();
    assert_eq!(
        names,
        [
            "rmem-place.service",
            "rmem-server.service",
            "rmem-swap@test.service"
        ]
    );
    for name in &names {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.join(name))
            .output()
            .expect("systemd-analyze (the systemd package) is installed by scripts/test.sh");
        let err = String::from_utf8_lossy(&out.stderr);
        // Lines about other units on this host are not ours to judge.
        let ours: Vec<&str> = err.lines().filter(|l| l.contains("rmem")).collect();
        assert!(out.status.success() && ours.is_empty(), "{name}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_example_configurations_are_read_by_their_commands() {
    let dir = scratch("conf");
    let secret = dir.join("secret");
    std::fs::write(&secret, "example-config-secret-0123456789").unwrap();
    let etc = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/etc/rmem");
    let s = secret.to_str().unwrap();

    // The donor: starts (on a free port, little memory) and says so.
    let (mut d, info) = support::spawn_json(Command::new(env!("CARGO_BIN_EXE_rmem")).args([
        "server",
        "--config",
        etc.join("server.toml").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--size",
        "16M",
        "--no-admin",
        "--hugepages",
        "never",
        "--no-pressure",
        "--secret-file",
        s,
        "--json",
    ]));
    assert_eq!(info["slab_size"], 16 << 20, "{info}");
    let _ = d.kill();
    let _ = d.wait();

    // The placement service: starts with the file's [service] table.
    let (mut p, info) = support::spawn_json(Command::new(env!("CARGO_BIN_EXE_rmem")).args([
        "place",
        "serve",
        "--config",
        etc.join("place.toml").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--secret-file",
        s,
        "--json",
    ]));
    assert_eq!(info["slab_bytes"], 16 << 20, "{info}");
    let _ = p.kill();
    let _ = p.wait();

    // The swap device: the file parses (a mistake in it is a usage error, 2); with nothing
    // listening at its addresses it then fails to reach them (5).
    let swap = etc.join("swap/example.toml");
    let out = rmem(&[
        "swap",
        "up",
        "--config",
        swap.to_str().unwrap(),
        "--secret-file",
        s,
        "--placement",
        "http://127.0.0.1:1",
        "--donor",
        "127.0.0.1:1",
        "--replicas",
        "1",
        "--connect-timeout",
        "2",
    ]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "size = \"8G\"\nreplicas = 2\nsurprise = 1\n").unwrap();
    let out = rmem(&[
        "swap",
        "up",
        "--config",
        bad.to_str().unwrap(),
        "--secret-file",
        s,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("surprise"));
    let _ = std::fs::remove_dir_all(&dir);
}
