//! `librmem_preload.so`: loaded into a stock QEMU with `LD_PRELOAD`, it lets the rmem migrate
//! agent track and serve the guest's RAM from outside QEMU.
//!
//! A userfaultfd only acts on the address space of the process that created it, so one must be
//! created inside QEMU. When `RMEM_PRELOAD_SOCKET` names a path, a thread listens there (mode
//! 0600). A request is one line, `wp PATH` or `minor PATH`, naming the guest's RAM file. The
//! library finds QEMU's mapping of that file, creates a userfaultfd and registers the mapping:
//! - `wp`: write-protect with asynchronous resolution (`WP_ASYNC`): the guest never stops, and
//!   the pages written since the last scan are read (and protected again) with PAGEMAP_SCAN on
//!   /proc/PID/pagemap (kernel 6.7+);
//! - `minor`: minor faults (the page is in the file, not yet mapped) go to the agent, which
//!   fills the page through its own mapping and maps it with UFFDIO_CONTINUE (post-copy); the
//!   mapping is zapped first so every access faults.
//!
//! The answer is one line, `ok PID ADDR LEN`, with the descriptor attached (SCM_RIGHTS), or
//! `err WHY`. The library keeps no copy: when the agent closes the descriptor, the registration
//! ends and QEMU runs on as if nothing happened.

/// Shared with the agent side (`rmem-migrate`), which must not link this library.
#[path = "../../src/uffd_abi.rs"]
pub mod abi;
#[path = "../../src/fdpass.rs"]
mod fdpass;
mod serve;

pub use serve::{find_mapping, Mapping};

/// The environment variable naming the socket.
pub const SOCKET_ENV: &str = "RMEM_PRELOAD_SOCKET";

extern "C" fn init() {
    if let Some(path) = std::env::var_os(SOCKET_ENV) {
        // The thread outlives nothing it borrows; a failure to start only means no agent can
        // attach, which the agent reports.
        let _ = std::thread::Builder::new()
            .name("rmem-preload".into())
            .spawn(move || serve::serve(std::path::Path::new(&path)));
    }
}

/// Runs `init` when the dynamic loader loads the library, before QEMU's main.
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;
