//! A store channel whose queue pairs broke gets new ones once its donors come back. A test
//! binary of its own: it cuts the TCP connections this process opened while the channel
//! opened, which must be the channel's alone.

use std::collections::HashMap;

use rmem_memserver::ByteSize;
use rmem_swapclient::{IoOp, IoReq, Store, StoreConfig};
use rmem_transport::{Buffer, HugePages};

mod common;
#[path = "../../memserver/tests/support/mod.rs"]
mod support;

use support::{blocking, TestDonor, SECRET};

const MIB: u64 = 1 << 20;
const BLOCK: usize = 4096;

async fn donor() -> TestDonor {
    support::donor_with(8, |c| {
        c.size = ByteSize(8 * MIB);
        c.slab_size = ByteSize(MIB);
    })
    .await
}

fn config(donors: &[&TestDonor]) -> StoreConfig {
    let addrs: Vec<_> = donors.iter().map(|d| d.addr).collect();
    common::store_config("channel-reopen-test", 4 * MIB, 2, 1, &addrs, SECRET)
}

/// This process's TCP sockets, by inode.
fn tcp_sockets() -> HashMap<String, i32> {
    let mut out = HashMap::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        let Ok(fd) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if link.starts_with("socket:") && is_tcp(fd) {
            out.insert(link, fd);
        }
    }
    out
}

fn is_tcp(fd: i32) -> bool {
    let mut proto: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_PROTOCOL writes one int into `proto`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&mut proto as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0 && proto == libc::IPPROTO_TCP
}

/// Writes one block through the channel and waits for its answer.
fn write_one(ch: &mut rmem_swapclient::StoreChannel<'_>, tag: u64, b: usize, fill: u8) -> bool {
    ch.buffer().write_at(0, &[fill; BLOCK]).unwrap();
    ch.submit(IoReq {
        tag,
        op: IoOp::Write,
        off: (b * BLOCK) as u64,
        len: BLOCK,
        at: 0,
    })
    .unwrap();
    let mut out = Vec::new();
    while out.is_empty() {
        ch.reap(&mut out, true).unwrap();
    }
    assert_eq!(out[0].0, tag);
    out[0].1.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_opens_new_queue_pairs_to_donors_that_come_back() {
    let (a, b) = (donor().await, donor().await);
    let store = Store::create(&config(&[&a, &b])).await.unwrap();
    let s = store.clone();
    blocking(move || {
        let rt = tokio::runtime::Handle::current();
        let before = tcp_sockets();
        let buf = Buffer::alloc(BLOCK, HugePages::Never).unwrap();
        let mut ch = rt.block_on(s.open_channel(buf, 1)).unwrap();
        let mine: Vec<i32> = tcp_sockets()
            .into_iter()
            .filter(|(k, _)| !before.contains_key(k))
            .map(|(_, fd)| fd)
            .collect();
        assert!(mine.len() >= 2, "the channel's connections: {mine:?}");
        assert!(write_one(&mut ch, 1, 0, 1));
        // The links of this channel's queue pairs break (the donors and the sessions live on).
        for fd in &mine {
            // SAFETY: a socket of this process; only its connection is cut, the fd stays.
            unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
        }
        assert!(
            !write_one(&mut ch, 2, 0, 2),
            "no queue pair left to write on"
        );
        assert!(s.status().donors.iter().all(|d| !d.healthy));
        assert!(rt.block_on(s.revive()), "the donors are reachable again");
        // The channel's next requests go out on new queue pairs, to both replicas.
        for blk in 0..16 {
            assert!(
                write_one(&mut ch, 10 + blk as u64, blk * 64, blk as u8),
                "block {blk} after the donors came back"
            );
        }
        let st = s.status();
        assert!(st.donors.iter().all(|d| d.healthy), "{st:?}");
        let mut back = vec![0u8; BLOCK];
        for blk in 0..16 {
            s.read((blk * 64 * BLOCK) as u64, &mut back).unwrap();
            assert!(back.iter().all(|&x| x == blk as u8), "block {blk}");
        }
    })
    .await;
    drop((a, b));
}
