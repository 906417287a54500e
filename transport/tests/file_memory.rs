//! Registering a file's pages (a VM's RAM file on tmpfs, say): what a peer WRITEs lands in the
//! file and in every other mapping of it, and a READ returns what another mapping wrote.

use std::time::Duration;

use tempfile::NamedTempFile;

use rmem_transport::{open, Access, Buffer, OpenOptions, Provider, QpConfig, SendWr};

/// A file of `pages` zero pages, removed when dropped.
fn temp_file(pages: usize) -> NamedTempFile {
    let f = NamedTempFile::new().unwrap();
    f.as_file().set_len((pages * 4096) as u64).unwrap();
    f
}

#[test]
fn two_mappings_of_one_file_see_each_others_writes() {
    let f = temp_file(3);
    let a = Buffer::map_file(f.as_file()).unwrap();
    let b = Buffer::map_file(f.as_file()).unwrap();
    assert_eq!(a.len(), 3 * 4096);
    a.write_at(4096 + 10, b"through a").unwrap();
    let mut got = [0u8; 9];
    b.read_at(4096 + 10, &mut got).unwrap();
    assert_eq!(&got, b"through a");
    let on_disk = std::fs::read(f.path()).unwrap();
    assert_eq!(&on_disk[4096 + 10..4096 + 19], b"through a");
    // Zeroing a file's pages clears the file (they are not dropped to come back from it).
    a.zero(0, 3 * 4096).unwrap();
    assert!(std::fs::read(f.path()).unwrap().iter().all(|&x| x == 0));
    b.read_at(4096 + 10, &mut got).unwrap();
    assert_eq!(got, [0; 9]);
}

#[test]
fn an_empty_file_is_refused() {
    let f = temp_file(0);
    assert!(Buffer::map_file(f.as_file()).is_err());
}

#[test]
fn one_sided_writes_and_reads_reach_a_registered_file() {
    let f = temp_file(4);
    // The "guest": another mapping of the same file, as a hypervisor would have.
    let guest = Buffer::map_file(f.as_file()).unwrap();
    guest.write_at(3 * 4096, b"guest page").unwrap();

    let target = open(&OpenOptions::new(Provider::Tcp)).unwrap();
    let (tpd, tcq) = (target.alloc_pd().unwrap(), target.create_cq(16).unwrap());
    let ram = Buffer::map_file(f.as_file()).unwrap();
    let mr = tpd
        .register_buffer(&ram, 0, ram.len(), Access::all_remote())
        .unwrap();
    let remote = mr.remote();
    let listener = target.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr();
    let served = std::thread::spawn(move || {
        listener
            .accept(
                &QpConfig::new(&tpd, &tcq),
                b"",
                Some(Duration::from_secs(10)),
            )
            .unwrap()
    });

    let peer = open(&OpenOptions::new(Provider::Tcp)).unwrap();
    let (pd, cq) = (peer.alloc_pd().unwrap(), peer.create_cq(16).unwrap());
    let conn = peer.connect(addr, &QpConfig::new(&pd, &cq), b"").unwrap();
    let _target_side = served.join().unwrap();
    let buf = pd.alloc_mr(4096, Access::LOCAL_WRITE).unwrap();

    buf.write_at(0, b"sent by a peer").unwrap();
    let sge = [buf.sge(0, 14).unwrap()];
    conn.qp
        .post_send(&[SendWr::write(1, &sge, remote.at(4096 + 5))])
        .unwrap();
    assert!(cq.wait_one(Some(Duration::from_secs(10))).unwrap().is_ok());
    let mut got = [0u8; 14];
    guest.read_at(4096 + 5, &mut got).unwrap();
    assert_eq!(
        &got, b"sent by a peer",
        "the WRITE is in the guest's mapping"
    );
    assert_eq!(
        &std::fs::read(f.path()).unwrap()[4096 + 5..4096 + 19],
        b"sent by a peer"
    );

    let sge = [buf.sge(0, 10).unwrap()];
    conn.qp
        .post_send(&[SendWr::read(2, &sge, remote.at(3 * 4096))])
        .unwrap();
    assert!(cq.wait_one(Some(Duration::from_secs(10))).unwrap().is_ok());
    let mut got = [0u8; 10];
    buf.read_at(0, &mut got).unwrap();
    assert_eq!(&got, b"guest page", "the READ returns what the guest wrote");
}
