//! `rmem-migrate`: moving a memory region (a VM's RAM file, a process's heap) between hosts.
//!
//! The engine is independent of any hypervisor. This crate holds its decisions, each testable
//! on its own:
//! - [`pages`]: which pages to move, as a bitmap, cut into contiguous runs; zero pages found
//!   so they are not sent;
//! - [`dirty`]: how the pages written since the last round are found ([`dirty::DirtyLog`]);
//! - [`converge`]: when to stop the source (the downtime the remaining pages would cost at the
//!   measured bandwidth and dirty rate), or switch to post-copy;
//! - [`phase`]: the phases of one migration and the only legal ways between them;
//! - [`mover`]: the runs moved one-sided (WRITE to push, READ to pull), many in flight;
//! - [`qmp`]: a client of QEMU's monitor, to drive a stock hypervisor;
//! - [`ram`]: a guest's RAM backends, found through QMP and checked movable;
//! - [`pipe`] and [`relay`]: control messages and QEMU's own migration connections carried
//!   between the agents over the transport;
//! - [`agent`], [`source`], [`dest`]: the two agents that drive a stock QEMU on each side.

pub mod agent;
pub mod control;
pub mod converge;
pub mod dedup;
pub mod dest;
pub mod dirty;
mod fdpass;
pub mod mover;
pub mod pages;
pub mod phase;
pub mod pipe;
pub mod postcopy;
pub mod prefault;
pub mod qmp;
pub mod ram;
pub mod relay;
pub mod source;
pub mod uffd;
pub mod uffd_abi;

pub use agent::{MigrateError, Mode, Progress, Report, Timeouts};
pub use control::{Dest, Source};
pub use converge::{Decision, Policy, Round};
pub use dest::{Receiver, RecvOptions};
pub use dirty::{DirtyLog, EverythingDirty, PageHashLog, PageSource, Slice};
pub use mover::{Link, MoveError, Moved, Mover};
pub use pages::{is_zero, PageSet, PAGE};
pub use phase::{Event, Phase, Phases};
pub use pipe::{Pipe, PipeError, PipeMemory, Stream};
pub use qmp::{Qmp, QmpError};
pub use source::{send, SendOptions};
