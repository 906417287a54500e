//! Finding a real QEMU's RAM backends, and refusing the ones rmem cannot move, with the reason.

use std::path::PathBuf;
use std::time::Duration;

use rmem_migrate::ram::{guest_ram, RamError};
use rmem_migrate::Qmp;

mod support;

use support::{sock, Qemu};

const SIZE: u64 = 4 << 20;

/// A RAM file of SIZE bytes under `dir`, removed when dropped.
struct RamFile(PathBuf);

impl RamFile {
    fn new(dir: &str, name: &str) -> RamFile {
        let p = PathBuf::from(dir).join(format!("rmem-ram-{name}-{}", std::process::id()));
        std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
        RamFile(p)
    }
}

impl Drop for RamFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The RAM backends QEMU reports for one `-object` definition.
fn ram_of(name: &str, object: String) -> Result<Vec<rmem_migrate::ram::GuestRam>, RamError> {
    let path = sock(name);
    let _qemu = Qemu::start(&path, &["-object".into(), object]);
    let mut q = Qmp::connect(&path, Duration::from_secs(10)).unwrap();
    let r = guest_ram(&mut q);
    let _ = std::fs::remove_file(&path);
    r
}

#[test]
fn a_shared_file_on_tmpfs_is_found() {
    let f = RamFile::new("/dev/shm", "ok");
    let obj = format!(
        "memory-backend-file,id=pc.ram,size={SIZE},mem-path={},share=on",
        f.0.display()
    );
    let ram = ram_of("ok", obj).unwrap();
    assert_eq!(ram.len(), 1);
    assert_eq!((ram[0].id.as_str(), ram[0].size), ("pc.ram", SIZE));
    assert_eq!(ram[0].path, f.0);
    assert!(!ram[0].huge);
}

#[test]
fn memfd_private_unshared_and_disk_ram_are_refused_with_the_reason() {
    let e = ram_of(
        "memfd",
        format!("memory-backend-memfd,id=m,size={SIZE},share=on"),
    )
    .unwrap_err();
    assert!(matches!(e, RamError::Memfd { .. }), "{e}");
    assert!(e.to_string().contains("empty"), "{e}");

    let e = ram_of("anon", format!("memory-backend-ram,id=r,size={SIZE}")).unwrap_err();
    assert!(matches!(e, RamError::Private { .. }), "{e}");

    let shm = RamFile::new("/dev/shm", "noshare");
    let obj = format!(
        "memory-backend-file,id=f,size={SIZE},mem-path={},share=off",
        shm.0.display()
    );
    let e = ram_of("noshare", obj).unwrap_err();
    assert!(matches!(e, RamError::NotShared { .. }), "{e}");

    // The build directory is on a disk filesystem (ext4 here); /dev/shm is tmpfs.
    let disk = RamFile::new(env!("CARGO_TARGET_TMPDIR"), "disk");
    let obj = format!(
        "memory-backend-file,id=d,size={SIZE},mem-path={},share=on",
        disk.0.display()
    );
    match ram_of("disk", obj) {
        Err(RamError::Disk { path, .. }) => assert_eq!(path, disk.0),
        other => panic!("a RAM file on disk: {other:?}"),
    }
}
