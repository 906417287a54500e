//! A real guest for the migration tests: Debian's kernel and a static /init (migrate/guest/init.c)
//! that keeps checking its own memory, booted under QEMU TCG with its RAM in a file.
//!
//! The guest prints `rmem-guest ready` once its 8 MiB hot set and 24 MiB cold set are filled,
//! then `tick N bad=M` every three rounds of about 100 ms: N is the round, M the pages found
//! wrong so far. A guest whose memory a migration damaged says so in M; one that stopped says
//! so by printing nothing more.
//!
//! ```ignore
//! let g = Guest::start("src", &GuestOpts::new(ram_file));
//! g.wait_ready(BOOT);
//! let t = g.wait_ticks(5, TICKS);
//! assert_eq!(t.bad, 0);
//! ```
//!
//! Each guest's serial port is a unix socket the harness listens on before QEMU starts (QEMU
//! connects as a client), read by one thread into lines, so no output is lost. After a
//! migration the ticks continue on the destination's serial port, not the source's.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long QEMU may take to connect its serial port and open its monitor.
const START: Duration = Duration::from_secs(30);
/// Serial lines shown when a wait fails.
const TAIL: usize = 30;

/// The kernel and initramfs the guest boots.
#[derive(Debug)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The guest's program as a process over a shared file (`writer --file PATH`).
    pub writer: PathBuf,
}

/// The guest image, built once per test process by migrate/guest/build.sh under the target
/// directory (the script takes a lock there, so test binaries running at once wait for one
/// another, and does nothing when the image is up to date).
pub fn image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rmem-guest");
        // This file serves the migrate crate's tests and the workspace's command-line tests.
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let script = [
            manifest.join("guest/build.sh"),
            manifest.join("migrate/guest/build.sh"),
        ]
        .into_iter()
        .find(|p| p.exists())
        .expect("migrate/guest/build.sh");
        let o = Command::new(&script)
            .arg(&out)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            o.status.success(),
            "{} failed ({}; scripts/test.sh installs gcc, cpio and linux-image-amd64):\n{}",
            script.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        GuestImage {
            kernel: out.join("vmlinuz"),
            initrd: out.join("initramfs.cpio.gz"),
            writer: out.join("writer"),
        }
    })
}

/// How a guest is started. `GuestOpts { incoming: true, ..GuestOpts::new(file) }` for a
/// migration's destination.
#[derive(Clone, Debug)]
pub struct GuestOpts {
    /// The RAM file (on /dev/shm); QEMU creates it when missing. Unused with `memfd`.
    pub ram_file: PathBuf,
    /// Guest RAM in MiB.
    pub ram_mb: u64,
    /// Waits for `migrate-incoming` (`-incoming defer`) instead of booting.
    pub incoming: bool,
    /// RAM in a `memory-backend-memfd` instead of the file (a backend rmem must refuse).
    pub memfd: bool,
    /// The backend's `share=`.
    pub share: bool,
    /// Loads rmem's preload library into QEMU, listening on this socket.
    pub preload: Option<PathBuf>,
    /// More QEMU arguments (a device the other side lacks, say).
    pub extra: Vec<String>,
}

impl GuestOpts {
    /// 128 MiB of shared RAM in `ram_file`, booting at once.
    pub fn new(ram_file: impl Into<PathBuf>) -> GuestOpts {
        GuestOpts {
            ram_file: ram_file.into(),
            ram_mb: 128,
            incoming: false,
            memfd: false,
            share: true,
            preload: None,
            extra: Vec::new(),
        }
    }
}

/// `librmem_preload.so`, built as a dev-dependency next to the test binaries.
pub fn preload_library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    [
        dir.join("librmem_preload.so"),
        dir.join("../librmem_preload.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .unwrap_or_else(|| panic!("librmem_preload.so next to {}", exe.display()))
}

/// One `tick N bad=M` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tick {
    /// The guest's round.
    pub n: u64,
    /// Pages found wrong so far.
    pub bad: u64,
}

/// What the serial port said so far.
#[derive(Default)]
struct Console {
    lines: Vec<String>,
    /// The line being received (no newline yet).
    partial: Vec<u8>,
    ticks: Vec<Tick>,
    ready: bool,
    /// A second `ready`, or a tick not after the one before: the guest restarted.
    restarted: bool,
    /// QEMU connected its serial port.
    connected: bool,
    /// The serial connection ended.
    closed: bool,
}

impl Console {
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b != b'\n' {
                self.partial.push(b);
                continue;
            }
            let line = String::from_utf8_lossy(&self.partial)
                .trim_end()
                .to_string();
            self.partial.clear();
            if line == "rmem-guest ready" {
                self.restarted |= self.ready;
                self.ready = true;
            } else if let Some(t) = parse_tick(&line) {
                self.restarted |= self.ticks.last().is_some_and(|l| l.n >= t.n);
                self.ticks.push(t);
            }
            self.lines.push(line);
        }
    }
}

fn parse_tick(line: &str) -> Option<Tick> {
    let (n, bad) = line.strip_prefix("tick ")?.split_once(" bad=")?;
    Some(Tick {
        n: n.parse().ok()?,
        bad: bad.parse().ok()?,
    })
}

struct Serial {
    console: Mutex<Console>,
    changed: Condvar,
}

/// A QEMU running the test guest; killed, and its sockets and log removed, when dropped.
pub struct Guest {
    name: String,
    child: Child,
    qmp: PathBuf,
    serial_path: PathBuf,
    log: PathBuf,
    serial: Arc<Serial>,
    reader: Option<JoinHandle<()>>,
}

impl Guest {
    /// Starts QEMU (TCG, one vCPU) on the guest image; `name` tells its files apart. Returns
    /// once QEMU has connected the serial port and opened its monitor, before the guest boots.
    pub fn start(name: &str, opts: &GuestOpts) -> Guest {
        let img = image();
        let base = std::env::temp_dir().join(format!("rmem-guest-{name}-{}", std::process::id()));
        let path = |ext: &str| {
            let p = base.with_extension(ext);
            let _ = std::fs::remove_file(&p);
            p
        };
        let (qmp, serial_path, log) = (path("qmp"), path("ser"), path("log"));

        let listener = UnixListener::bind(&serial_path)
            .unwrap_or_else(|e| panic!("binding {}: {e}", serial_path.display()));
        let serial = Arc::new(Serial {
            console: Mutex::new(Console::default()),
            changed: Condvar::new(),
        });
        let s = serial.clone();
        let reader = std::thread::spawn(move || read_serial(listener, &s));

        let mb = opts.ram_mb;
        let share = if opts.share { "on" } else { "off" };
        let backend = if opts.memfd {
            format!("memory-backend-memfd,id=pc.ram,size={mb}M,share={share}")
        } else {
            format!(
                "memory-backend-file,id=pc.ram,size={mb}M,mem-path={},share={share}",
                opts.ram_file.display()
            )
        };
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-machine", "pc,accel=tcg", "-smp", "1", "-m"])
            .arg(format!("{mb}M"))
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-kernel")
            .arg(&img.kernel)
            .arg("-initrd")
            .arg(&img.initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .args(["-object", &backend, "-machine", "memory-backend=pc.ram"])
            // The monitor's socket is created before QEMU connects the serial port (chardevs
            // open in command-line order), so a connected serial port means a ready monitor.
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-chardev")
            .arg(format!("socket,id=ser0,path={}", serial_path.display()))
            .args(["-serial", "chardev:ser0"]);
        cmd.args(&opts.extra);
        if opts.incoming {
            cmd.args(["-incoming", "defer"]);
        }
        if let Some(sock) = &opts.preload {
            cmd.env("LD_PRELOAD", preload_library())
                .env("RMEM_PRELOAD_SOCKET", sock);
        }
        let log_file = File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("qemu-system-x86_64 (scripts/test.sh installs qemu-system-x86)");

        let mut g = Guest {
            name: name.to_string(),
            child,
            qmp,
            serial_path,
            log,
            serial,
            reader: Some(reader),
        };
        g.wait("QEMU to connect its serial port", START, |c| c.connected);
        assert!(
            g.qmp.exists(),
            "{}",
            g.failure("no monitor socket once the serial port connected")
        );
        g
    }

    /// The monitor's socket, for [`rmem_migrate::Qmp::connect`].
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `rmem-guest ready` (its memory filled).
    pub fn wait_ready(&mut self, timeout: Duration) {
        self.wait("rmem-guest ready", timeout, |c| c.ready);
    }

    /// Waits until `n_more` ticks have come after this call and returns the last one. Fails
    /// if the guest restarted.
    pub fn wait_ticks(&mut self, n_more: usize, timeout: Duration) -> Tick {
        let want = self.console().ticks.len() + n_more;
        let what = format!("{n_more} more ticks");
        self.wait(&what, timeout, |c| c.ticks.len() >= want || c.restarted);
        let (restarted, last) = {
            let c = self.console();
            (c.restarted, c.ticks.last().copied())
        };
        assert!(!restarted, "{}", self.failure("the guest restarted"));
        last.expect("ticks counted")
    }

    /// The ticks so far, oldest first.
    pub fn ticks(&self) -> Vec<Tick> {
        self.console().ticks.clone()
    }

    /// Whether QEMU exits within `timeout` (it was told to quit, say).
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Kills QEMU at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn console(&self) -> MutexGuard<'_, Console> {
        // The reader never panics holding the lock; a poisoned one is still readable.
        self.serial
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `done` holds, failing with the serial tail and QEMU's messages if `timeout`
    /// passes, QEMU exits or the serial port closes first.
    fn wait(&mut self, what: &str, timeout: Duration, done: impl Fn(&Console) -> bool) {
        let deadline = Instant::now() + timeout;
        let serial = self.serial.clone();
        let mut c = serial.console.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if done(&c) {
                return;
            }
            let now = Instant::now();
            let why = if now >= deadline {
                Some(format!("no {what} within {timeout:?}"))
            } else if c.closed {
                Some(format!("the serial port closed before {what}"))
            } else if let Ok(Some(st)) = self.child.try_wait() {
                Some(format!("QEMU exited ({st}) before {what}"))
            } else {
                None
            };
            if let Some(why) = why {
                drop(c);
                panic!("{}", self.failure(&why));
            }
            // Woken by every serial line; the short bound only notices QEMU exiting.
            let step = (deadline - now).min(Duration::from_millis(250));
            c = match serial.changed.wait_timeout(c, step) {
                Ok((c, _)) => c,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// `why`, the last serial lines and QEMU's own messages.
    fn failure(&self, why: &str) -> String {
        let c = self.console();
        let tail = &c.lines[c.lines.len().saturating_sub(TAIL)..];
        let mut s = format!(
            "guest {}: {why}\n-- serial (last {TAIL} lines):\n",
            self.name
        );
        for l in tail {
            s += l;
            s.push('\n');
        }
        if !c.partial.is_empty() {
            s += &String::from_utf8_lossy(&c.partial);
            s.push('\n');
        }
        s += "-- QEMU:\n";
        s += &std::fs::read_to_string(&self.log).unwrap_or_default();
        s
    }
}

/// Accepts QEMU's serial connection and reads it into lines until it closes.
fn read_serial(listener: UnixListener, serial: &Serial) {
    let set = |f: &dyn Fn(&mut Console)| {
        f(&mut serial.console.lock().unwrap());
        serial.changed.notify_all();
    };
    let Ok((mut conn, _)) = listener.accept() else {
        set(&|c| c.closed = true);
        return;
    };
    set(&|c| c.connected = true);
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => set(&|c| c.add(&buf[..n])),
        }
    }
    set(&|c| c.closed = true);
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
        // A reader still waiting for QEMU to connect is woken by a connection of our own; one
        // reading sees the connection close with QEMU.
        if !self.console().connected {
            let _ = UnixStream::connect(&self.serial_path);
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        for p in [&self.qmp, &self.serial_path, &self.log] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// xxh3-128 of a whole file (a RAM file, say).
pub fn hash_file(path: &Path) -> u128 {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return h.digest128(),
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
}

/// Pages in the guest's cold set.
pub const COLD_PAGES: u64 = (24 << 20) / 4096;

/// The first word of cold page `i`: init.c's `seed_of(i, 0, 1)`.
pub fn cold_word0(i: u64) -> u64 {
    let mut x = (i ^ (1 << 62)).wrapping_add(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^= x >> 31;
    x.max(1)
}

/// Offsets in a guest's RAM file of the pages holding a cold page, found by their first word.
pub fn find_cold_pages(ram_file: &Path) -> Vec<u64> {
    let words: std::collections::HashSet<u64> = (0..COLD_PAGES).map(cold_word0).collect();
    let f = File::open(ram_file).unwrap_or_else(|e| panic!("{}: {e}", ram_file.display()));
    let mut buf = vec![0u8; 1 << 20];
    let mut found = Vec::new();
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off).unwrap();
        if n == 0 {
            return found;
        }
        for (i, page) in buf[..n].chunks_exact(4096).enumerate() {
            let w = u64::from_ne_bytes(page[..8].try_into().unwrap());
            if words.contains(&w) {
                found.push(off + i as u64 * 4096);
            }
        }
        off += n as u64;
    }
}
