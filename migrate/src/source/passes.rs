//! The source's passes over its RAM: the regions mapped and registered, the dirty logs, pages
//! sent, offered for dedup, and compared with the destination's by hash.

use super::*;

/// The source's RAM, mapped and registered.
pub(super) struct Region {
    pub(super) buf: Buffer,
    pub(super) mr: Mr,
    /// The RAM file, asked again where its holes are.
    pub(super) file: std::fs::File,
    path: PathBuf,
}

/// The pages of each region that are holes in its file now: zero there, never to be read (a
/// read through the mapping would allocate them). A running guest fills holes at any time, so
/// a hole is left out of a pass only when the dirty log was armed before this was asked, or
/// the guest is paused.
pub(super) fn holes(regions: &[Region]) -> Result<Vec<PageSet>, MigrateError> {
    regions
        .iter()
        .map(|r| {
            file_holes(&r.file)
                .map_err(|e| MigrateError::io(format!("holes of {}", r.path.display()), e))
        })
        .collect()
}

/// Removes the pages of `skip` from `sets`, region by region.
pub(super) fn leave_out(sets: &mut [PageSet], skip: &[PageSet]) {
    for (s, k) in sets.iter_mut().zip(skip) {
        for p in k.iter() {
            s.remove(p);
        }
    }
}

/// Every page of every region but the holes and what the destination filled itself.
pub(super) fn all_but_known(
    regions: &[Region],
    holes: &[PageSet],
    have: Option<&DedupHave>,
) -> Vec<PageSet> {
    let mut sets: Vec<PageSet> = regions
        .iter()
        .map(|r| PageSet::full(r.buf.len() / PAGE))
        .collect();
    leave_out(&mut sets, holes);
    if let Some(have) = have {
        leave_out(&mut sets, &have.pages);
    }
    sets
}

/// The source's RAM files, mapped and registered (for the destination's READs too in
/// post-copy).
pub(super) fn map_regions(
    pd: &Pd,
    rams: &[GuestRam],
    readable: bool,
) -> Result<Vec<Region>, MigrateError> {
    let access = if readable {
        Access::LOCAL_WRITE | Access::REMOTE_READ
    } else {
        Access::LOCAL_WRITE
    };
    rams.iter()
        .map(|ram| {
            let f = FileOptions::new()
                .read(true)
                .write(true)
                .open(&ram.path)
                .map_err(|e| MigrateError::io(format!("open {}", ram.path.display()), e))?;
            let buf = Buffer::map_file(&f)?;
            let mr = pd.register_buffer(&buf, 0, buf.len(), access)?;
            Ok(Region {
                buf,
                mr,
                file: f,
                path: ram.path.clone(),
            })
        })
        .collect()
}

/// The dirty logs for pre-copy: exact through the preload library when QEMU has it, else page
/// hashes.
pub(super) fn dirty_logs(
    handoffs: Vec<Handoff>,
    regions: &[Region],
) -> Result<Vec<Box<dyn DirtyLog>>, MigrateError> {
    if handoffs.is_empty() {
        return Ok(regions
            .iter()
            .map(|r| Box::new(PageHashLog::new(r.buf.len() / PAGE)) as Box<dyn DirtyLog>)
            .collect());
    }
    handoffs
        .into_iter()
        .map(|h| Ok(Box::new(WrittenLog::new(h)?) as Box<dyn DirtyLog>))
        .collect()
}

pub(super) fn collect(
    regions: &[Region],
    logs: &mut [Box<dyn DirtyLog>],
) -> Result<Vec<PageSet>, MigrateError> {
    regions
        .iter()
        .zip(logs)
        .map(|(r, log)| {
            let mut set = PageSet::new(r.buf.len() / PAGE);
            log.collect(&Mapped(&r.buf), &mut set)?;
            Ok(set)
        })
        .collect()
}

pub(super) fn send_all(
    mover: &Mover,
    links: &[Link<'_>],
    sets: &[PageSet],
    dest_zero: &mut [PageSet],
    report: &mut Report,
) -> Result<(), MigrateError> {
    for ((link, set), dz) in links.iter().zip(sets).zip(dest_zero) {
        let m = mover.write(*link, set, dz)?;
        report.pages_sent += m.pages;
        report.requests += m.requests;
        report.zero_pages_skipped += m.zero_pages;
    }
    Ok(())
}

/// What one pre-copy round moved.
#[derive(Debug, Default)]
pub(super) struct RoundMoved {
    pub(super) pages: usize,
    pub(super) zero_pages: usize,
    pub(super) requests: usize,
    /// Pages left for the next round: the guest wrote them after this one began.
    pub(super) deferred: usize,
}

/// Pages per slice of a round: each slice asks the log which of its pages the guest has
/// written since the round began, just before sending it.
const ROUND_SLICE: usize = 8192;

/// Sends a pre-copy round: `sets` per region, slice by slice, leaving out pages the log says
/// were written since the round began (the next round sends them; sent now they would move
/// twice). A log that cannot tell sends everything.
pub(super) fn send_round(
    mover: &Mover,
    links: &[Link<'_>],
    sets: &[PageSet],
    dest_zero: &mut [PageSet],
    logs: &mut [Box<dyn DirtyLog>],
) -> Result<RoundMoved, MigrateError> {
    let mut out = RoundMoved::default();
    for (((link, set), dz), log) in links.iter().zip(sets).zip(dest_zero).zip(logs) {
        let n = set.len();
        let mut start = 0;
        while start < n {
            let end = (start + ROUND_SLICE).min(n);
            let mut slice = set.range(start, end);
            if slice.is_empty() {
                start = end;
                continue;
            }
            let mut written = PageSet::new(n);
            if log.written_since(start, end, &mut written)? {
                for p in written.iter() {
                    if slice.contains(p) {
                        slice.remove(p);
                        out.deferred += 1;
                    }
                }
            }
            let m = mover.write(*link, &slice, dz)?;
            out.pages += m.pages;
            out.zero_pages += m.zero_pages;
            out.requests += m.requests;
            start = end;
        }
    }
    Ok(out)
}

/// What the destination filled from RAM it already holds, and the hashes offered for it.
pub(super) struct DedupHave {
    pub(super) pages: Vec<PageSet>,
    offered: Vec<Vec<u128>>,
}

impl DedupHave {
    /// Takes out the pages written since they were offered (a running guest writes any page at
    /// any time) and returns them: the destination's copies are stale. Asked with the source
    /// paused, what is left is exactly what the destination holds right.
    pub(super) fn take_changed(&mut self, key: &DedupKey, regions: &[Region]) -> Vec<PageSet> {
        self.pages
            .iter_mut()
            .zip(&self.offered)
            .zip(regions)
            .map(|((have, offered), r)| {
                let changed = dedup::changed_since(key, &Mapped(&r.buf), have, offered);
                for p in changed.iter() {
                    have.remove(p);
                }
                changed
            })
            .collect()
    }

    pub(super) fn count(&self) -> usize {
        self.pages.iter().map(PageSet::count).sum()
    }
}

/// Offers a keyed hash of every page; returns the pages the destination filled itself.
pub(super) fn dedup_offer(
    peer: &Peer,
    regions: &[Region],
    holes: &[PageSet],
    timeout: Duration,
) -> Result<DedupHave, MigrateError> {
    let hashes: Vec<Vec<u128>> = regions
        .iter()
        .zip(holes)
        .map(|(r, h)| dedup::offer(&peer.key, &Mapped(&r.buf), h))
        .collect();
    let total: usize = hashes.iter().map(Vec::len).sum();
    peer.send(&Msg::DedupOffer {
        pages: total as u64,
    })?;
    let raw: Vec<u8> = hashes
        .iter()
        .flatten()
        .flat_map(|h| h.to_le_bytes())
        .collect();
    peer.pipe.send_bulk(&raw)?;
    match peer.recv(timeout)? {
        Msg::DedupHave { bitmaps } => Ok(DedupHave {
            pages: decode_sets(
                &bitmaps,
                &regions
                    .iter()
                    .map(|r| r.buf.len() / PAGE)
                    .collect::<Vec<_>>(),
            )?,
            offered: hashes,
        }),
        m => Err(unexpected("the pages the destination holds", &m)),
    }
}

/// The pages whose hashes differ between the two sides, per region.
pub(super) fn differing(
    peer: &Peer,
    regions: &[Region],
    timeout: Duration,
) -> Result<Vec<PageSet>, MigrateError> {
    peer.send(&Msg::HashRequest)?;
    // Hash this side while the destination hashes its own.
    let ours: Vec<Vec<u128>> = regions
        .iter()
        .map(|r| page_hashes(&Mapped(&r.buf)))
        .collect();
    let total: usize = ours.iter().map(Vec::len).sum();
    match peer.recv(timeout)? {
        Msg::Hashes { pages } if pages == total as u64 => {}
        m => return Err(unexpected("hashes of every page", &m)),
    }
    let raw = peer.pipe.recv_bulk(total * 16, timeout)?;
    let mut theirs = raw
        .chunks_exact(16)
        .map(|c| u128::from_le_bytes(c.try_into().unwrap_or_default()));
    Ok(ours
        .iter()
        .map(|hs| {
            let mut set = PageSet::new(hs.len());
            for (p, h) in hs.iter().enumerate() {
                if theirs.next() != Some(*h) {
                    set.insert(p);
                }
            }
            set
        })
        .collect())
}

/// Post-copy: the scan for zero pages among the `needed` ones the destination holds as zero
/// (`dest_zero`), to run once the destination runs (the source is paused for good: what is
/// zero then stays zero; scanning during the switch-over would take a core from QEMU saving
/// and loading the device state). It tells the destination, which maps those without a READ.
pub(super) fn zero_scan_of(
    regions: &[Region],
    needed: Vec<PageSet>,
    dest_zero: &[PageSet],
    pipe: &Arc<Pipe>,
) -> Box<dyn FnOnce() + Send> {
    let bufs: Vec<Buffer> = regions.iter().map(|r| r.buf.clone()).collect();
    let files: Vec<Option<std::fs::File>> =
        regions.iter().map(|r| r.file.try_clone().ok()).collect();
    let pipe = pipe.clone();
    let known_zero = dest_zero.to_vec();
    Box::new(move || {
        let bitmaps = bufs
            .iter()
            .zip(&files)
            .zip(&needed)
            .zip(&known_zero)
            .map(|(((b, f), need), dz)| {
                // Holes are zero without reading them (a read would allocate them); not
                // knowing them only costs reads.
                let holes = f
                    .as_ref()
                    .and_then(|f| file_holes(f).ok())
                    .unwrap_or_else(|| PageSet::new(need.len()));
                let mut z = PageSet::new(need.len());
                for p in need.iter().filter(|&p| dz.contains(p)) {
                    if holes.contains(p) || b.is_zero(p * PAGE, PAGE).unwrap_or(false) {
                        z.insert(p);
                    }
                }
                z
            })
            .collect::<Vec<_>>();
        let bitmaps = encode_sets(&bitmaps);
        let _ = pipe.send_msg(&Msg::ZeroPages { bitmaps }.encode());
    })
}
