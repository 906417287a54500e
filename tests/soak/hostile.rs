//! Hostile peers for the soak: each runs until `stop` is set and counts what it did.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rmem_wire::nbd::{Request, CMD_READ};
use rmem_wire::protocol::{read_frame, write_msg, ClientMsg, ServerMsg, VERSION};

/// What the attackers did, for the report.
#[derive(Default)]
pub struct Tally {
    pub connections: AtomicU64,
    pub reconnects: AtomicU64,
    pub nbd_reads_queued: AtomicU64,
}

pub struct Attack {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub tally: Arc<Tally>,
}

impl Attack {
    pub fn stop(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.tally
    }
}

/// An attacker's pacing between its moves: sleeps `d` in steps, false as soon as it should stop.
fn pause(stop: &AtomicBool, d: Duration) -> bool {
    let step = Duration::from_millis(20);
    let mut left = d;
    while !left.is_zero() {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(step.min(left));
        left = left.saturating_sub(step);
    }
    !stop.load(Ordering::Relaxed)
}

/// Starts every kind of attacker against the donor's control port, data listener and NBD port.
pub fn start(control: SocketAddr, data: SocketAddr, nbd: SocketAddr, secret: &[u8]) -> Attack {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut threads = Vec::new();
    let mut spawn = |name: &str, f: Box<dyn FnOnce(Arc<AtomicBool>, Arc<Tally>) + Send>| {
        let (s, t) = (stop.clone(), tally.clone());
        threads.push(
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || f(s, t))
                .unwrap(),
        );
    };
    // Idle sockets that never say anything, on every port (fewer on NBD, whose per-address
    // limit would otherwise refuse the unread-replies clients below).
    for (target, n) in [(control, 20), (data, 20), (nbd, 8)] {
        spawn(
            "idle",
            Box::new(move |stop, tally| {
                let mut held = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    held.retain(|s: &TcpStream| {
                        s.set_nonblocking(true).is_ok()
                            && !matches!((&*s).read(&mut [0u8; 1]), Ok(0))
                    });
                    while held.len() < n {
                        match TcpStream::connect(target) {
                            Ok(s) => {
                                tally.connections.fetch_add(1, Ordering::Relaxed);
                                held.push(s)
                            }
                            Err(_) => break,
                        }
                    }
                    pause(&stop, Duration::from_millis(500));
                }
            }),
        );
    }
    // Slow hellos: a byte every second on the data listener and the control port.
    for target in [data, control] {
        for _ in 0..4 {
            spawn(
                "trickle",
                Box::new(move |stop, tally| {
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut s) = TcpStream::connect(target) else {
                            pause(&stop, Duration::from_millis(200));
                            continue;
                        };
                        tally.connections.fetch_add(1, Ordering::Relaxed);
                        for b in b"RMEX\x01\x00\x01\x01".iter().cycle() {
                            if s.write_all(&[*b]).is_err() || !pause(&stop, Duration::from_secs(1))
                            {
                                break;
                            }
                        }
                    }
                }),
            );
        }
    }
    // Garbage: random bytes on every port, a connection every 20 ms.
    spawn(
        "garbage",
        Box::new(move |stop, tally| {
            let mut x = 0x2545_f491_4f6c_dd1du64;
            let mut junk = [0u8; 256];
            while pause(&stop, Duration::from_millis(20)) {
                for target in [control, data, nbd] {
                    for b in junk.iter_mut() {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *b = x as u8;
                    }
                    if let Ok(mut s) = TcpStream::connect(target) {
                        tally.connections.fetch_add(1, Ordering::Relaxed);
                        let _ = s.write_all(&junk);
                    }
                }
            }
        }),
    );
    // An authenticated session asking for data connections as fast as it is answered.
    let secret = secret.to_vec();
    spawn(
        "reconnects",
        Box::new(move |stop, tally| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Ok(mut s) = tokio::net::TcpStream::connect(control).await else {
                    return;
                };
                let nonce_c = rmem_wire::auth::nonce();
                let hello = ClientMsg::Hello {
                    version: VERSION,
                    client: "flood".into(),
                    nonce: nonce_c.clone(),
                };
                if write_msg(&mut s, &hello).await.is_err() {
                    return;
                }
                let Ok(ServerMsg::Challenge { nonce, .. }) =
                    serde_json::from_slice(&read_frame(&mut s).await.unwrap_or_default())
                else {
                    return;
                };
                let mac = rmem_wire::auth::client_proof(&secret, &nonce, &nonce_c, "flood");
                if write_msg(&mut s, &ClientMsg::Auth { mac }).await.is_err()
                    || read_frame(&mut s).await.is_err()
                {
                    return;
                }
                let mut id = 0;
                while !stop.load(Ordering::Relaxed) {
                    id += 1;
                    if write_msg(&mut s, &ClientMsg::Reconnect { id, lane: 0 })
                        .await
                        .is_err()
                        || read_frame(&mut s).await.is_err()
                    {
                        return;
                    }
                    tally.reconnects.fetch_add(1, Ordering::Relaxed);
                }
            });
        }),
    );
    // NBD clients that queue 64 READs of 32 MiB each and never read a reply.
    for _ in 0..2 {
        spawn(
            "nbd-unread",
            Box::new(move |stop, tally| {
                if let Ok(s) = nbd_flood(nbd, &tally) {
                    while pause(&stop, Duration::from_millis(100)) {}
                    drop(s);
                }
            }),
        );
    }
    Attack {
        stop,
        threads,
        tally,
    }
}

/// Fixed-newstyle handshake for export "soak", then 64 pipelined 32 MiB READs.
fn nbd_flood(addr: SocketAddr, tally: &Tally) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)?;
    s.write_all(&3u32.to_be_bytes())?; // fixed newstyle, no zeroes
    let name = b"soak";
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name);
    s.write_all(&opt)?;
    let mut export = [0u8; 10];
    s.read_exact(&mut export)?;
    let size = u64::from_be_bytes(export[..8].try_into().unwrap());
    let len = (32u64 << 20).min(size) as u32;
    for cookie in 0..64u64 {
        s.write_all(&Request::new(CMD_READ, cookie, 0, len).encode())?;
        tally.nbd_reads_queued.fetch_add(1, Ordering::Relaxed);
    }
    Ok(s)
}
