//! What the migration tests share: a QEMU with no guest and its monitor socket, and a real
//! guest that checks its own memory (guest.rs).
#![allow(dead_code)] // each test file uses what it needs

mod guest;

#[allow(unused_imports)] // each test file uses what it needs
pub use guest::{
    find_cold_pages, hash_file, image, preload_library, Guest, GuestImage, GuestOpts, Tick,
    COLD_PAGES,
};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A fresh path in the temp dir for `name`, nothing there.
pub fn sock(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("rmem-qmp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// A QEMU with no machine (`-machine none`) plus `extra` arguments, its monitor on `path`;
/// killed when dropped.
pub struct Qemu(Child);

impl Qemu {
    pub fn start(path: &Path, extra: &[String]) -> Qemu {
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "none",
                "-nodefaults",
                "-display",
                "none",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", path.display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 (scripts/test.sh installs qemu-system-x86)");
        let t = Instant::now();
        while !path.exists() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no QMP socket after 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Qemu(child)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
