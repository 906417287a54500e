//! What an agent drives on its side: a QEMU through its monitor, or, without a hypervisor, a
//! process whose memory is a shared file (the source) and the file it goes to (the
//! destination).
//!
//! The agents speak QMP's vocabulary (`query-status`, `stop`, `cont`, `migrate`, ...). A
//! process or a file answers the same commands with what they mean for it: a process pauses
//! with SIGSTOP and resumes with SIGCONT, has no device state (its `migrate` completes at
//! once) and no migration settings; a destination file is "inmigrate" until the source says
//! every page is sent. So one agent moves both, and the process case tests the engine where
//! no QEMU runs (over verbs between Soft-RoCE VMs, say).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::agent::{MigrateError, RamDesc};
use crate::qmp::Qmp;
use crate::ram::{check_file, guest_ram, GuestRam};

/// What a source agent moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The guest of the QEMU whose QMP socket this is.
    Qemu(PathBuf),
    /// A process writing a shared file on tmpfs or hugetlbfs.
    Process { pid: u32, file: PathBuf },
}

/// Where a destination agent receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// A QEMU waiting with `-incoming defer`, by its QMP socket.
    Qemu(PathBuf),
    /// A file on tmpfs or hugetlbfs, created (or resized) to the source's size.
    File(PathBuf),
}

/// One side's hypervisor, or what stands for it.
pub enum Control {
    Qemu(Qmp),
    Process(Process),
    File(FileDest),
}

/// A source process.
pub struct Process {
    pid: u32,
    file: PathBuf,
    migrated: bool,
}

/// A destination file.
pub struct FileDest {
    path: PathBuf,
    pages_done: bool,
}

impl Control {
    pub fn source(s: &Source, timeout: Duration) -> Result<Control, MigrateError> {
        Ok(match s {
            Source::Qemu(sock) => Control::Qemu(Qmp::connect(sock, timeout)?),
            Source::Process { pid, file } => {
                proc_state(*pid)?;
                Control::Process(Process {
                    pid: *pid,
                    file: file.clone(),
                    migrated: false,
                })
            }
        })
    }

    pub fn dest(d: &Dest, timeout: Duration) -> Result<Control, MigrateError> {
        Ok(match d {
            Dest::Qemu(sock) => Control::Qemu(Qmp::connect(sock, timeout)?),
            Dest::File(path) => Control::File(FileDest {
                path: path.clone(),
                pages_done: false,
            }),
        })
    }

    /// What it is, for messages.
    pub fn what(&self) -> &'static str {
        match self {
            Control::Qemu(_) => "QEMU",
            Control::Process(_) => "process",
            Control::File(_) => "file",
        }
    }

    /// The QEMU monitor, when a QEMU is what this drives.
    pub fn qmp(&mut self) -> Option<&mut Qmp> {
        match self {
            Control::Qemu(q) => Some(q),
            _ => None,
        }
    }

    /// Runs a QMP command, or what it means for a process or a file.
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, MigrateError> {
        match self {
            Control::Qemu(q) => Ok(q.execute(command, args)?),
            Control::Process(p) => p.execute(command),
            Control::File(f) => f.execute(command),
        }
    }

    /// The run state (`running`, `paused`, `inmigrate`, `postmigrate`...).
    pub fn status(&mut self) -> Result<String, MigrateError> {
        let s = self.execute("query-status", None)?;
        Ok(s.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    /// The RAM to move. A destination file takes the source's layout (`theirs`): one region,
    /// created or resized to its size.
    pub fn ram(&mut self, theirs: &[RamDesc]) -> Result<Vec<GuestRam>, MigrateError> {
        match self {
            Control::Qemu(q) => Ok(guest_ram(q)?),
            Control::Process(p) => {
                let size = std::fs::metadata(&p.file)
                    .map_err(|e| MigrateError::io(format!("{}", p.file.display()), e))?
                    .len();
                Ok(vec![check_file("file".into(), p.file.clone(), size)?])
            }
            Control::File(f) => {
                let [one] = theirs else {
                    return Err(MigrateError::Refused(format!(
                        "a destination file takes one region; the source has {}",
                        theirs.len()
                    )));
                };
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .open(&f.path)
                    .map_err(|e| MigrateError::io(format!("create {}", f.path.display()), e))?;
                file.set_len(one.size)
                    .map_err(|e| MigrateError::io(format!("size {}", f.path.display()), e))?;
                Ok(vec![check_file(one.id.clone(), f.path.clone(), one.size)?])
            }
        }
    }

    /// The source has sent every page (a destination file is then complete).
    pub fn pages_done(&mut self) {
        if let Control::File(f) = self {
            f.pages_done = true;
        }
    }
}

impl Process {
    fn execute(&mut self, command: &str) -> Result<Value, MigrateError> {
        Ok(match command {
            "query-status" => {
                let s = if proc_state(self.pid)? == 'T' {
                    "paused"
                } else {
                    "running"
                };
                json!({"status": s, "running": s == "running"})
            }
            "query-migrate" if self.migrated => json!({"status": "completed", "downtime": 0}),
            "query-migrate" => json!({}),
            "query-migrate-capabilities" => json!([]),
            "query-migrate-parameters" | "migrate-set-capabilities" | "migrate-set-parameters" => {
                json!({})
            }
            "stop" => {
                signal(self.pid, libc::SIGSTOP)?;
                // SIGSTOP lands asynchronously: paused means stopped.
                let t = Instant::now();
                while proc_state(self.pid)? != 'T' {
                    if t.elapsed() > Duration::from_secs(5) {
                        return Err(MigrateError::Refused(format!(
                            "process {} did not stop",
                            self.pid
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                json!({})
            }
            "cont" => {
                signal(self.pid, libc::SIGCONT)?;
                json!({})
            }
            // No device state: the memory is all there is.
            "migrate" => {
                self.migrated = true;
                json!({})
            }
            "migrate_cancel" => {
                self.migrated = false;
                json!({})
            }
            other => {
                return Err(MigrateError::Protocol(format!(
                    "{other} means nothing for a process"
                )))
            }
        })
    }
}

impl FileDest {
    fn execute(&mut self, command: &str) -> Result<Value, MigrateError> {
        Ok(match command {
            "query-status" if self.pages_done => json!({"status": "received"}),
            "query-status" => json!({"status": "inmigrate"}),
            "query-migrate" if self.pages_done => json!({"status": "completed"}),
            "query-migrate" => json!({"status": "active"}),
            "migrate-set-capabilities" | "migrate-incoming" | "cont" | "stop" => json!({}),
            // Abandoned: a half-received file must not pass for a whole one.
            "quit" => {
                let _ = std::fs::remove_file(&self.path);
                json!({})
            }
            other => {
                return Err(MigrateError::Protocol(format!(
                    "{other} means nothing for a destination file"
                )))
            }
        })
    }
}

/// A process's state letter from /proc/PID/stat (`R`, `S`, `T`...).
fn proc_state(pid: u32) -> Result<char, MigrateError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| MigrateError::Refused(format!("process {pid}: {e}")))?;
    // The name is in parentheses and may hold spaces: the state follows the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .ok_or_else(|| MigrateError::Refused(format!("process {pid}: unreadable /proc stat")))
}

fn signal(pid: u32, sig: i32) -> Result<(), MigrateError> {
    // SAFETY: kill(2) with a pid and a signal number; no memory involved.
    if unsafe { libc::kill(pid as i32, sig) } != 0 {
        return Err(MigrateError::io(
            format!("signal process {pid}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_pauses_and_resumes_by_signal() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, [0u8; 4096]).unwrap();
        let mut c = Control::source(
            &Source::Process {
                pid: child.id(),
                file,
            },
            Duration::from_secs(1),
        )
        .unwrap();
        let st = |c: &mut Control| c.execute("query-status", None).unwrap()["status"].clone();
        assert_eq!(st(&mut c), "running");
        c.execute("stop", None).unwrap();
        assert_eq!(st(&mut c), "paused");
        c.execute("cont", None).unwrap();
        let t = Instant::now();
        while st(&mut c) != "running" && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(st(&mut c), "running");
        assert_eq!(c.execute("query-migrate", None).unwrap(), json!({}));
        c.execute("migrate", None).unwrap();
        assert_eq!(
            c.execute("query-migrate", None).unwrap()["status"],
            "completed"
        );
        assert!(c.execute("human-monitor-command", None).is_err());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_destination_file_is_incoming_until_every_page_is_sent_and_removed_on_quit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        let mut c = Control::dest(&Dest::File(path.clone()), Duration::from_secs(1)).unwrap();
        assert_eq!(
            c.execute("query-status", None).unwrap()["status"],
            "inmigrate"
        );
        c.pages_done();
        assert_eq!(
            c.execute("query-status", None).unwrap()["status"],
            "received"
        );
        std::fs::write(&path, b"x").unwrap();
        c.execute("quit", None).unwrap();
        assert!(!path.exists());
    }
}
