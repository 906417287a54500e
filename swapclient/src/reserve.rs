//! The kernel's free-memory reserve while rmem swap is up (`vm.min_free_kbytes`, and
//! `vm.watermark_boost_factor`).
//!
//! Swapping to rmem needs memory: each page written out travels through the daemon's sockets
//! to a donor, and the kernel allocates those socket buffers as the daemon sends. A process
//! cannot draw on the kernel's emergency reserves the way an in-kernel swap device does, so
//! when the host runs out of memory altogether the page that would free memory waits for
//! memory: swap stops and the kernel's request times out. A larger `vm.min_free_kbytes` makes
//! the kernel reclaim (by swapping) while that headroom is still there. Measured in a 384 MiB
//! guest: the kernel's default (2.2 MiB) stalls within seconds; 64 MiB swaps twice the guest's
//! RAM through.
//!
//! Watermark boosting undoes that headroom: after an allocation falls back to another
//! migrate type (socket buffers are such allocations) the kernel raises every watermark, the
//! minimum included, until kswapd has reclaimed the boost, which on a host whose only
//! reclaimable memory is swap only this daemon can let it do. Seen in the two-VM test: free
//! memory 44 MiB, the minimum 40 MiB plus a 6 MiB boost, the daemon's sends waiting and swap
//! stopped for over a minute until the kernel dropped the device. So boosting is off
//! (`watermark_boost_factor` 0) while the device is swap.

use std::path::Path;
use std::str::FromStr;

pub const SYSCTL: &str = "/proc/sys/vm/min_free_kbytes";
pub const BOOST_SYSCTL: &str = "/proc/sys/vm/watermark_boost_factor";

/// What `--min-free` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinFree {
    /// Raise the reserve to [`auto_kib`] of the host's memory if it is lower.
    #[default]
    Auto,
    /// Leave the sysctl alone.
    Keep,
    /// Raise the reserve to at least this many KiB.
    Kib(u64),
}

impl FromStr for MinFree {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => return Ok(MinFree::Auto),
            "keep" => return Ok(MinFree::Keep),
            _ => {}
        }
        let (num, mult) = match s.as_bytes().last() {
            Some(b'K' | b'k') => (&s[..s.len() - 1], 1),
            Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 10),
            Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 20),
            _ => (s, 1),
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?}: expected auto, keep or a size such as 64M"))?;
        n.checked_mul(mult)
            .map(MinFree::Kib)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

/// The reserve `auto` asks for: 64 MiB, or an eighth of a host smaller than 512 MiB.
pub fn auto_kib(mem_total_kib: u64) -> u64 {
    (64 << 10).min(mem_total_kib / 8)
}

/// The reserve to set, or `None` when the current one is enough (or `keep`).
pub fn target(want: MinFree, current_kib: u64, mem_total_kib: u64) -> Option<u64> {
    let t = match want {
        MinFree::Keep => return None,
        MinFree::Auto => auto_kib(mem_total_kib),
        MinFree::Kib(k) => k,
    };
    (t > current_kib).then_some(t)
}

/// A sysctl set for the device's life: the old value comes back on drop, unless someone else
/// changed it since.
#[derive(Debug)]
pub struct Raised {
    path: std::path::PathBuf,
    old: u64,
    set: u64,
}

impl Raised {
    pub fn old_kib(&self) -> u64 {
        self.old
    }
    pub fn set_kib(&self) -> u64 {
        self.set
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        let name = self.path.display();
        match read_kib(&self.path) {
            Ok(now) if now == self.set => {
                if let Err(e) = std::fs::write(&self.path, self.old.to_string()) {
                    tracing::warn!(error = %e, "could not restore {name}");
                } else {
                    tracing::info!(value = self.old, "{name} restored");
                }
            }
            Ok(now) => tracing::info!(now, "{name} changed by someone else; left as is"),
            Err(e) => tracing::warn!(error = %e, "could not read {name}"),
        }
    }
}

fn read_kib(path: &Path) -> std::io::Result<u64> {
    let s = std::fs::read_to_string(path)?;
    s.trim()
        .parse()
        .map_err(|_| std::io::Error::other(format!("{}: not a number: {s:?}", path.display())))
}

/// The host's memory (MemTotal) in KiB.
pub fn mem_total_kib() -> std::io::Result<u64> {
    let s = std::fs::read_to_string("/proc/meminfo")?;
    s.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no MemTotal in /proc/meminfo"))
}

/// Raises the reserve at `path` (the sysctl, or a file in tests) as `want` asks.
pub fn raise(path: &Path, want: MinFree, mem_total_kib: u64) -> std::io::Result<Option<Raised>> {
    let old = read_kib(path)?;
    match target(want, old, mem_total_kib) {
        Some(value) => hold(path, old, value).map(Some),
        None => Ok(None),
    }
}

/// Writes `value` to `path`, which held `old`: the guard puts `old` back.
fn hold(path: &Path, old: u64, value: u64) -> std::io::Result<Raised> {
    std::fs::write(path, value.to_string())?;
    Ok(Raised {
        path: path.to_path_buf(),
        old,
        set: value,
    })
}

/// Sets `path` (a sysctl, or a file in tests) to `value` when it holds another.
pub fn set(path: &Path, value: u64) -> std::io::Result<Option<Raised>> {
    let old = read_kib(path)?;
    if old == value {
        return Ok(None);
    }
    hold(path, old, value).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_and_words() {
        assert_eq!("auto".parse(), Ok(MinFree::Auto));
        assert_eq!("keep".parse(), Ok(MinFree::Keep));
        assert_eq!("65536".parse(), Ok(MinFree::Kib(65536)));
        assert_eq!("64M".parse(), Ok(MinFree::Kib(65536)));
        assert_eq!("512k".parse(), Ok(MinFree::Kib(512)));
        assert_eq!("1G".parse(), Ok(MinFree::Kib(1 << 20)));
        assert!("lots".parse::<MinFree>().is_err());
        assert!("-1M".parse::<MinFree>().is_err());
        assert!("99999999999999999G".parse::<MinFree>().is_err());
    }

    #[test]
    fn auto_is_64m_or_an_eighth_of_a_small_host_and_never_lowers() {
        assert_eq!(auto_kib(64 << 20), 64 << 10);
        assert_eq!(auto_kib(384 << 10), 48 << 10);
        assert_eq!(
            target(MinFree::Auto, 2205, 329 << 10),
            Some((329 << 10) / 8)
        );
        assert_eq!(target(MinFree::Auto, 90_000, 64 << 20), None);
        assert_eq!(target(MinFree::Kib(1000), 2205, 1 << 20), None);
        assert_eq!(target(MinFree::Keep, 0, 1 << 20), None);
    }

    #[test]
    fn raises_then_restores_unless_changed_since() {
        let p = std::env::temp_dir().join(format!("rmem-min-free-test-{}", std::process::id()));
        std::fs::write(&p, "2205\n").unwrap();
        let r = raise(&p, MinFree::Kib(65536), 1 << 20).unwrap().unwrap();
        assert_eq!((r.old_kib(), r.set_kib()), (2205, 65536));
        assert_eq!(read_kib(&p).unwrap(), 65536);
        drop(r);
        assert_eq!(read_kib(&p).unwrap(), 2205);

        let r = raise(&p, MinFree::Kib(65536), 1 << 20).unwrap().unwrap();
        std::fs::write(&p, "100000").unwrap();
        drop(r);
        assert_eq!(read_kib(&p).unwrap(), 100000, "another change is kept");

        assert!(raise(&p, MinFree::Kib(4096), 1 << 20).unwrap().is_none());
        assert_eq!(read_kib(&p).unwrap(), 100000);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn set_lowers_too_and_leaves_an_equal_value_alone() {
        let p = std::env::temp_dir().join(format!("rmem-boost-test-{}", std::process::id()));
        std::fs::write(&p, "15000\n").unwrap();
        let r = set(&p, 0).unwrap().unwrap();
        assert_eq!(read_kib(&p).unwrap(), 0);
        assert!(
            set(&p, 0).unwrap().is_none(),
            "already 0: nothing to restore"
        );
        drop(r);
        assert_eq!(read_kib(&p).unwrap(), 15000);
        let _ = std::fs::remove_file(&p);
    }
}
