//! Pages moved one-sided between two RAM files over the tcp provider on loopback: pushed with
//! WRITE, pulled with READ, zero pages left out, layouts checked, a vanished peer an error.

use std::time::Duration;

use tempfile::NamedTempFile;

use rmem_migrate::{Link, MoveError, Mover, PageSet, PAGE};
use rmem_transport::{open, Access, Buffer, Context, Cq, Mr, OpenOptions, Provider, Qp, QpConfig};

const PAGES: usize = 300;

/// A RAM file of `PAGES` zero pages, removed when dropped.
struct Ram(NamedTempFile);

impl Ram {
    fn new() -> Ram {
        let f = NamedTempFile::new().unwrap();
        f.as_file().set_len((PAGES * PAGE) as u64).unwrap();
        Ram(f)
    }

    fn file(&self) -> &std::fs::File {
        self.0.as_file()
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(self.0.path()).unwrap()
    }
}

/// The source side's view: its registered RAM, a queue pair to the destination, and the
/// destination's RAM as a remote buffer.
struct Side {
    local: Mr,
    qp: Qp,
    cq: Cq,
    remote: rmem_transport::RemoteBuf,
    /// The destination's side, kept alive for the test's length.
    dest: Option<(Context, Mr, Qp)>,
}

impl Side {
    fn link(&self) -> Link<'_> {
        Link {
            qp: &self.qp,
            cq: &self.cq,
            local: &self.local,
            remote: &self.remote,
        }
    }
}

fn link(src: &Ram, dst: &Ram, dst_pages: usize) -> Side {
    let dctx = open(&OpenOptions::new(Provider::Tcp)).unwrap();
    let (dpd, dcq) = (dctx.alloc_pd().unwrap(), dctx.create_cq(64).unwrap());
    let dram = Buffer::map_file(dst.file()).unwrap();
    let dmr = dpd
        .register_buffer(&dram, 0, dst_pages * PAGE, Access::all_remote())
        .unwrap();
    let remote = dmr.remote();
    let l = dctx.listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = l.local_addr();
    let accepted = std::thread::spawn(move || {
        let qp = l
            .accept(
                &QpConfig::new(&dpd, &dcq),
                b"",
                Some(Duration::from_secs(10)),
            )
            .unwrap()
            .qp;
        (dctx, qp)
    });
    let sctx = open(&OpenOptions::new(Provider::Tcp)).unwrap();
    let (spd, scq) = (sctx.alloc_pd().unwrap(), sctx.create_cq(64).unwrap());
    let sram = Buffer::map_file(src.file()).unwrap();
    let local = spd
        .register_buffer(&sram, 0, sram.len(), Access::LOCAL_WRITE)
        .unwrap();
    let conn = sctx.connect(addr, &QpConfig::new(&spd, &scq), b"").unwrap();
    let (dctx, dqp) = accepted.join().unwrap();
    Side {
        local,
        qp: conn.qp,
        cq: scq,
        remote,
        dest: Some((dctx, dmr, dqp)),
    }
}

/// Source RAM: page p holds its number, except every third page, which is zero.
fn fill(src: &Ram) {
    let b = Buffer::map_file(src.file()).unwrap();
    for p in (0..PAGES).filter(|p| p % 3 != 0) {
        b.write_at(p * PAGE, &vec![(p % 251) as u8 + 1; PAGE])
            .unwrap();
    }
}

#[test]
fn writes_push_every_non_zero_page_in_runs() {
    let (src, dst) = (Ram::new(), Ram::new());
    fill(&src);
    let l = link(&src, &dst, PAGES);
    let mover = Mover {
        depth: 8,
        max_run_pages: 16,
        ..Mover::default()
    };
    let all = PageSet::full(PAGES);
    let m = mover
        .write(l.link(), &all, &mut PageSet::full(PAGES))
        .unwrap();
    assert_eq!(m.zero_pages, PAGES.div_ceil(3));
    assert_eq!(m.pages + m.zero_pages, PAGES);
    assert!(m.requests < m.pages, "runs, not a request per page");
    assert_eq!(dst.bytes(), src.bytes(), "the two RAM files are equal");
}

#[test]
fn a_rate_holds_writes_back_and_still_moves_every_page() {
    let (src, dst) = (Ram::new(), Ram::new());
    fill(&src);
    let l = link(&src, &dst, PAGES);
    let rate = 4_000_000;
    let mover = Mover {
        max_run_pages: 16,
        rate: Some(rate),
        ..Mover::default()
    };
    let t = std::time::Instant::now();
    let m = mover
        .write(l.link(), &PageSet::full(PAGES), &mut PageSet::full(PAGES))
        .unwrap();
    let took = t.elapsed().as_secs_f64();
    // Every run but the last is posted no earlier than the bytes before it allow.
    let floor = ((m.pages - 16) * PAGE) as f64 / rate as f64;
    assert!(
        took >= floor,
        "{} bytes in {took:.3} s at {rate} B/s",
        m.bytes()
    );
    assert_eq!(dst.bytes(), src.bytes());
}

#[test]
fn a_page_zeroed_after_it_was_sent_is_sent_again() {
    let (src, dst) = (Ram::new(), Ram::new());
    fill(&src);
    let l = link(&src, &dst, PAGES);
    let mut dest_zero = PageSet::full(PAGES);
    let all = PageSet::full(PAGES);
    Mover::default()
        .write(l.link(), &all, &mut dest_zero)
        .unwrap();
    assert_eq!(
        dest_zero.count(),
        PAGES.div_ceil(3),
        "sent pages are no longer known zero"
    );
    // Page 1 was sent non-zero; now it is zero at the source.
    Buffer::map_file(src.file())
        .unwrap()
        .write_at(PAGE, &[0u8; PAGE])
        .unwrap();
    let mut again = PageSet::new(PAGES);
    again.insert(1);
    again.insert(3); // zero on both sides all along: left out
    let m = Mover::default()
        .write(l.link(), &again, &mut dest_zero)
        .unwrap();
    assert_eq!((m.pages, m.zero_pages), (1, 1));
    assert_eq!(dst.bytes(), src.bytes());
}

#[test]
fn reads_pull_exactly_the_pages_asked_for() {
    let (src, dst) = (Ram::new(), Ram::new());
    fill(&src);
    // The pulling side is the one with the empty RAM: swap the roles.
    let l = link(&dst, &src, PAGES);
    let mut want = PageSet::new(PAGES);
    for p in [1, 2, 4, 5, 100, 299] {
        want.insert(p);
    }
    let m = Mover::default().read(l.link(), &want).unwrap();
    assert_eq!((m.pages, m.requests), (6, 4), "runs 1-2, 4-5, 100, 299");
    let (s, d) = (src.bytes(), dst.bytes());
    for p in 0..PAGES {
        let page = |b: &[u8]| b[p * PAGE..(p + 1) * PAGE].to_vec();
        if want.contains(p) {
            assert_eq!(page(&d), page(&s), "page {p}");
        } else {
            assert!(
                page(&d).iter().all(|&x| x == 0),
                "page {p} was not asked for"
            );
        }
    }
}

#[test]
fn different_layouts_are_refused_before_anything_moves() {
    let (src, dst) = (Ram::new(), Ram::new());
    fill(&src);
    let l = link(&src, &dst, PAGES - 1);
    let e = Mover::default()
        .write(l.link(), &PageSet::full(PAGES), &mut PageSet::full(PAGES))
        .unwrap_err();
    assert!(matches!(e, MoveError::Layout { .. }), "{e}");
    assert!(dst.bytes().iter().all(|&x| x == 0));
}

#[test]
fn a_vanished_destination_is_an_error_not_a_hang() {
    let (src, dst) = (Ram::new(), Ram::new());
    fill(&src);
    let mut l = link(&src, &dst, PAGES);
    // The destination goes away: its queue pair and context close.
    let (ctx, mr, qp) = l.dest.take().unwrap();
    qp.shutdown();
    drop((qp, mr, ctx));
    let t = std::time::Instant::now();
    let e = Mover {
        timeout: Duration::from_secs(5),
        ..Mover::default()
    }
    .write(l.link(), &PageSet::full(PAGES), &mut PageSet::full(PAGES))
    .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        matches!(e, MoveError::Completion { .. } | MoveError::Transport(_)),
        "{e}"
    );
}
