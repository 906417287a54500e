//! A QEMU Machine Protocol client: what `rmem migrate` needs to drive a stock QEMU (capabilities,
//! `migrate-incoming`, `migrate`, `query-migrate`, `stop`, `cont`).
//!
//! One JSON object per line each way. QEMU greets with `{"QMP": {"version": ...}}`; the client
//! must send `qmp_capabilities` before any other command. Replies carry the command's `id`;
//! asynchronous events (`{"event": ...}`) may come between them and are kept for the caller.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// Longest monitor line read (QEMU's replies for a small VM are a few KiB).
const MAX_LINE: u64 = 4 << 20;

/// What went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to the QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a QEMU monitor (it did not greet with QMP)")]
    NotQemu(String),
    #[error("no QMP greeting on {path} within {timeout:?}: not a QEMU monitor, or another client holds it (a QMP socket serves one client at a time: give rmem a -qmp socket of its own)")]
    NoGreeting { path: String, timeout: Duration },
    #[error("QEMU closed the monitor connection")]
    Closed,
    #[error("QEMU did not answer within {0:?}")]
    Timeout(Duration),
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("malformed QMP message: {0}")]
    Malformed(String),
    #[error("QMP socket")]
    Io(#[source] std::io::Error),
}

/// A connected monitor, capabilities negotiated.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    version: (u64, u64, u64),
    next_id: u64,
    events: Vec<Value>,
    timeout: Duration,
    /// A line begun but not ended when a read timed out (see [`Qmp::wait_event`]).
    partial: String,
}

impl Qmp {
    /// Connects, checks the greeting is QEMU's and negotiates capabilities. Every read is
    /// bounded by `timeout`, so a socket that is not QEMU (or a hung QEMU) fails instead of
    /// hanging.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let shown = path.display().to_string();
        let s = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: shown.clone(),
            source,
        })?;
        s.set_read_timeout(Some(timeout)).map_err(QmpError::Io)?;
        s.set_write_timeout(Some(timeout)).map_err(QmpError::Io)?;
        let writer = s.try_clone().map_err(QmpError::Io)?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
            version: (0, 0, 0),
            next_id: 1,
            events: Vec::new(),
            timeout,
            partial: String::new(),
        };
        let greeting = match q.read_message() {
            Ok(v) => v,
            Err(QmpError::Timeout(_)) => {
                return Err(QmpError::NoGreeting {
                    path: shown,
                    timeout,
                })
            }
            Err(QmpError::Malformed(_) | QmpError::Closed) => return Err(QmpError::NotQemu(shown)),
            Err(e) => return Err(e),
        };
        let Some(v) = greeting.get("QMP").and_then(|q| q.get("version")) else {
            return Err(QmpError::NotQemu(shown));
        };
        let n = |k: &str| v.pointer(&format!("/qemu/{k}")).and_then(Value::as_u64);
        q.version = (
            n("major").unwrap_or(0),
            n("minor").unwrap_or(0),
            n("micro").unwrap_or(0),
        );
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// QEMU's version (major, minor, micro).
    pub fn version(&self) -> (u64, u64, u64) {
        self.version
    }

    /// The user and group QEMU runs as (the monitor's peer credentials): a socket QEMU is to
    /// connect to must be theirs. None when the kernel does not say.
    pub fn peer_owner(&self) -> Option<(u32, u32)> {
        use std::os::fd::AsRawFd;
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt(SO_PEERCRED) writes at most `len` bytes into `cred`, a ucred we
        // own, on a socket descriptor we hold.
        let rc = unsafe {
            libc::getsockopt(
                self.writer.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        (rc == 0 && cred.pid != 0).then_some((cred.uid, cred.gid))
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| self.io(e))?;
        loop {
            let m = self.read_message()?;
            if m.get("event").is_some() {
                self.events.push(m);
                continue;
            }
            if m.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(QmpError::Malformed(format!(
                    "a reply to another command: {m}"
                )));
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            return Err(QmpError::Malformed(m.to_string()));
        }
    }

    /// Events received so far (oldest first), taken out of the client.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Waits up to `timeout` for an event `wanted` accepts (one received earlier counts) and
    /// takes it out; `None` when none came. Other events are kept. QEMU emits events as they
    /// happen, so this sees a state change at once where polling a query would not.
    pub fn wait_event(
        &mut self,
        wanted: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Option<Value>, QmpError> {
        if let Some(i) = self.events.iter().position(&wanted) {
            return Ok(Some(self.events.remove(i)));
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // A zero read timeout would mean "block forever".
            self.set_read_timeout(left.max(Duration::from_micros(100)))?;
            let m = self.read_message();
            self.set_read_timeout(self.timeout)?;
            match m {
                Ok(m) if m.get("event").is_some() => {
                    if wanted(&m) {
                        return Ok(Some(m));
                    }
                    self.events.push(m);
                }
                Ok(m) => return Err(QmpError::Malformed(format!("a reply to no command: {m}"))),
                Err(QmpError::Timeout(_)) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads what QEMU still says until it closes the monitor (after `quit`, say), keeping
    /// the events; false if it has not closed within `timeout`.
    pub fn read_to_close(&mut self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || self.set_read_timeout(left).is_err() {
                return false;
            }
            match self.read_message() {
                Ok(m) if m.get("event").is_some() => self.events.push(m),
                Ok(_) => {}
                Err(QmpError::Closed) => return true,
                Err(_) => return false,
            }
        }
    }

    fn set_read_timeout(&self, t: Duration) -> Result<(), QmpError> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(t))
            .map_err(QmpError::Io)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        // Bounded: a peer that is not QEMU may send anything, for as long as it likes. A read
        // that times out keeps what it got of a line for the next one.
        let limit = MAX_LINE.saturating_sub(self.partial.len() as u64);
        let r = std::io::Read::take(&mut self.reader, limit).read_line(&mut self.partial);
        if let Err(e) = r {
            return Err(self.io(e));
        }
        let line = std::mem::take(&mut self.partial);
        match r {
            Ok(0) => Err(QmpError::Closed),
            _ if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE => Err(
                QmpError::Malformed(format!("a line of {} bytes or more", line.len())),
            ),
            // The end of the stream in the middle of a line.
            _ if !line.ends_with('\n') => Err(QmpError::Closed),
            _ => serde_json::from_str(&line)
                .map_err(|e| QmpError::Malformed(format!("{e}: {}", line.trim_end()))),
        }
    }

    fn io(&self, e: std::io::Error) -> QmpError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                QmpError::Timeout(self.timeout)
            }
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                QmpError::Closed
            }
            _ => QmpError::Io(e),
        }
    }
}
