//! Finding a QEMU guest's RAM and checking that rmem can move it.
//!
//! rmem moves RAM that both it and QEMU map: a `memory-backend-file` with `share=on` on tmpfs or
//! hugetlbfs. Everything else is refused before anything is paused, with the reason:
//! - `memory-backend-memfd`: QEMU 7.2 skips memfd RAM under `x-ignore-shared` on the source,
//!   but the destination gets a fresh, empty memfd: the guest would resume on zeros;
//! - `memory-backend-ram` (anonymous, private): no other process can map it;
//! - a file with `share=off`: QEMU's writes stay in its private copy, never in the file;
//! - a file on a disk filesystem: every page written would also be written to disk.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::qmp::{Qmp, QmpError};

/// `f_type` of tmpfs and hugetlbfs (linux/magic.h).
const TMPFS_MAGIC: u64 = 0x0102_1994;
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;

/// One RAM backend of a guest that rmem can move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRam {
    /// The backend's QOM id (`pc.ram`, say).
    pub id: String,
    /// The file both QEMU and rmem map.
    pub path: PathBuf,
    pub size: u64,
    /// On hugetlbfs.
    pub huge: bool,
}

/// Why a guest's RAM cannot be moved by rmem.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("QEMU reports no memory backend: start it with -object memory-backend-file,id=pc.ram,share=on,mem-path=/dev/shm/FILE,size=... -machine memory-backend=pc.ram")]
    NoBackend,
    #[error("RAM backend {id} is memfd: QEMU skips it under x-ignore-shared but the destination gets an empty one; use memory-backend-file,share=on on tmpfs or hugetlbfs")]
    Memfd { id: String },
    #[error("RAM backend {id} is private ({kind}): no other process can map it; use memory-backend-file,share=on on tmpfs or hugetlbfs")]
    Private { id: String, kind: String },
    #[error("RAM backend {id} has share=off: QEMU's writes stay in its private copy, not in {path}; use share=on")]
    NotShared { id: String, path: PathBuf },
    #[error("RAM backend {id}'s file {path} is not on tmpfs or hugetlbfs: every page written would also go to disk")]
    Disk { id: String, path: PathBuf },
    #[error("RAM backend {id}'s file {path}")]
    File {
        id: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("RAM backend {id}'s file {path} is {file} bytes, QEMU's backend {qemu}")]
    Size {
        id: String,
        path: PathBuf,
        file: u64,
        qemu: u64,
    },
    #[error("QEMU's answer to {0} is not what QEMU says")]
    Reply(&'static str),
}

/// The guest's RAM backends, each checked movable.
pub fn guest_ram(q: &mut Qmp) -> Result<Vec<GuestRam>, RamError> {
    let devs = q.execute("query-memdev", None)?;
    let devs = devs.as_array().ok_or(RamError::Reply("query-memdev"))?;
    if devs.is_empty() {
        return Err(RamError::NoBackend);
    }
    let mut out = Vec::with_capacity(devs.len());
    for d in devs {
        let id = d
            .get("id")
            .and_then(Value::as_str)
            .ok_or(RamError::Reply("query-memdev"))?
            .to_string();
        let size = d
            .get("size")
            .and_then(Value::as_u64)
            .ok_or(RamError::Reply("query-memdev"))?;
        let share = d.get("share").and_then(Value::as_bool).unwrap_or(false);
        let prop = |q: &mut Qmp, p: &str| {
            q.execute(
                "qom-get",
                Some(json!({"path": format!("/objects/{id}"), "property": p})),
            )
        };
        let kind = prop(q, "type")?;
        let kind = kind.as_str().ok_or(RamError::Reply("qom-get type"))?;
        match kind {
            "memory-backend-file" => {}
            "memory-backend-memfd" => return Err(RamError::Memfd { id }),
            other => {
                return Err(RamError::Private {
                    id,
                    kind: other.to_string(),
                })
            }
        }
        let path = prop(q, "mem-path")?;
        let path = PathBuf::from(path.as_str().ok_or(RamError::Reply("qom-get mem-path"))?);
        if !share {
            return Err(RamError::NotShared { id, path });
        }
        out.push(check_file(id, path, size)?);
    }
    Ok(out)
}

/// Checks a RAM file: on tmpfs or hugetlbfs, of the backend's size.
pub fn check_file(id: String, path: PathBuf, size: u64) -> Result<GuestRam, RamError> {
    let meta = std::fs::metadata(&path).map_err(|source| RamError::File {
        id: id.clone(),
        path: path.clone(),
        source,
    })?;
    let magic = fs_magic(&path).map_err(|source| RamError::File {
        id: id.clone(),
        path: path.clone(),
        source,
    })?;
    let huge = match magic {
        HUGETLBFS_MAGIC => true,
        TMPFS_MAGIC => false,
        _ => return Err(RamError::Disk { id, path }),
    };
    if meta.len() != size {
        return Err(RamError::Size {
            id,
            path,
            file: meta.len(),
            qemu: size,
        });
    }
    Ok(GuestRam {
        id,
        path,
        size,
        huge,
    })
}

fn fs_magic(path: &Path) -> std::io::Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs reads a NUL-terminated path we own and writes one struct statfs we own.
    let (rc, st) = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut st), st)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_type as u64)
}
