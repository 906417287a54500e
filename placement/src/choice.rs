//! The decision core: which donors hold a borrower's chunks.
//!
//! A [`Pool`] is the placement's view of every donor as four numbers (free and total slabs, a
//! failure domain, and the share of its link already in use). A [`Chooser`] places chunks in it:
//! each chunk gets `replicas` donors in distinct failure domains, and the pool is charged at once,
//! so the next decision sees the last one. The default strategy samples `d` donors and takes the
//! one whose worse resource (free memory or link headroom) is best, which is what keeps both
//! balanced without scanning 10,000 donors (power of d choices; Infiniswap used d = 2 on free
//! memory alone). The other strategies are there to be measured against it.
//!
//! ```
//! use rmem_placement::choice::{Chooser, Pool, Slot, Strategy};
//! let mut pool = Pool::new((0..8).map(|i| Slot::new(100, i % 4)).collect());
//! let mut chooser = Chooser::new(Strategy::Weighted { d: 2 }, 7);
//! let plan = chooser.place(&mut pool, 10, 2).unwrap();
//! assert_eq!(plan.chunks(), 10);
//! assert_eq!(pool.free_slabs(), 800 - 20);
//! ```

use std::collections::BTreeSet;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Links are not loaded past this share by link-aware strategies: the rest is the margin that
/// keeps a path's latency flat.
pub const DEFAULT_MAX_LOAD: f32 = 0.9;

/// Link use up to which a link counts as idle in scoring.
pub const DEFAULT_COMFORT: f32 = 0.5;

/// Draws per wanted sample before a sampling strategy gives up on luck and scans: only a nearly
/// full pool gets there.
const DRAWS_PER_SAMPLE: usize = 8;

/// One donor as the decision core sees it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    pub free: u32,
    pub total: u32,
    /// A small integer naming the failure domain (a rack, a power feed).
    pub domain: u32,
    /// Share of the donor's link in use or reserved, 0.0-1.0 (and above, if overloaded).
    pub load: f32,
}

impl Slot {
    /// An empty donor with an idle link.
    pub fn new(total: u32, domain: u32) -> Slot {
        Slot {
            free: total,
            total,
            domain,
            load: 0.0,
        }
    }

    fn used_fraction(&self) -> f64 {
        if self.total == 0 {
            return 1.0;
        }
        f64::from(self.total - self.free.min(self.total)) / f64::from(self.total)
    }

    fn free_fraction(&self) -> f32 {
        if self.total == 0 {
            return 0.0;
        }
        self.free.min(self.total) as f32 / self.total as f32
    }

    /// min(free memory, link headroom): a donor is as good as its scarcer resource. Headroom
    /// counts as plenty (1.0) while the link is no busier than `comfort`, and shrinks to 0 as
    /// it fills from there: a link at 40% is not the scarce resource of a donor with 30% of
    /// its memory free, and counting it as such would leave busy-link donors' memory idle.
    pub fn score(&self, comfort: f32) -> f32 {
        let headroom = ((1.0 - self.load) / (1.0 - comfort).max(1e-3)).min(1.0);
        self.free_fraction().min(headroom)
    }
}

/// How donors are picked. `Weighted` is the one rmem uses; the others are baselines. Written
/// as its name (`weighted-d2`, `p2c`, ...) in JSON and TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Strategy {
    /// The donor with the most free slabs, by a full scan (rmem swap's own choice without a
    /// placement service): O(donors), and it fills the largest donors first.
    Scan,
    /// Any donor with room, uniformly.
    Random,
    /// The least utilized donor, exactly (an ordered index): herds when its view is stale.
    LeastLoaded,
    /// The less utilized of two random donors (Infiniswap): memory only.
    P2c,
    /// The best of `d` random donors by [`Slot::score`], never loading a link past the limit.
    Weighted { d: u8 },
}

impl Strategy {
    /// Whether this strategy looks at links (and so keeps them under the load limit).
    pub fn link_aware(self) -> bool {
        matches!(self, Strategy::Weighted { .. })
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Strategy::Scan => f.write_str("scan"),
            Strategy::Random => f.write_str("random"),
            Strategy::LeastLoaded => f.write_str("least-loaded"),
            Strategy::P2c => f.write_str("p2c"),
            Strategy::Weighted { d } => write!(f, "weighted-d{d}"),
        }
    }
}

impl From<Strategy> for String {
    fn from(s: Strategy) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for Strategy {
    type Error = String;
    fn try_from(s: String) -> Result<Strategy, String> {
        s.parse()
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Strategy, String> {
        Ok(match s {
            "scan" => Strategy::Scan,
            "random" => Strategy::Random,
            "least-loaded" => Strategy::LeastLoaded,
            "p2c" => Strategy::P2c,
            _ => {
                let d = s
                    .strip_prefix("weighted-d")
                    .and_then(|d| d.parse::<u8>().ok())
                    .filter(|&d| d >= 1)
                    .ok_or_else(|| {
                        format!(
                            "unknown strategy {s:?}: scan, random, least-loaded, p2c or weighted-dN"
                        )
                    })?;
                Strategy::Weighted { d }
            }
        })
    }
}

/// Why chunks could not be placed. Nothing was charged to the pool.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error("{wanted} slabs wanted, {free} free")]
    Full { wanted: u64, free: u64 },
    #[error(
        "{replicas} replicas need as many failure domains with free slabs; {domains} have any"
    )]
    TooFewDomains { replicas: usize, domains: usize },
    #[error("chunk {chunk} finds no donor with a free slab in another failure domain")]
    NoDonor { chunk: usize },
    #[error("replicas must be 1 to {max}, not {replicas}")]
    Replicas { replicas: usize, max: usize },
}

/// The most replicas of one chunk rmem keeps.
pub const MAX_REPLICAS: usize = 8;

/// Every donor the placement knows, as the decision core sees them. Indices are stable: a donor
/// that leaves keeps its index with nothing free until the pool is rebuilt.
#[derive(Debug, Clone)]
pub struct Pool {
    slots: Vec<Slot>,
    /// Load each slab placed adds to its donor's link (0 when loads come only from measurement).
    slab_load: f32,
    max_load: f32,
    /// Link use below which headroom is not scored down ([`Slot::score`]).
    comfort: f32,
    /// Ordered by utilization, kept only once `LeastLoaded` asks for it.
    by_use: Option<BTreeSet<(u64, u32)>>,
    /// Sum of `free` over all slots, kept as they change (a decision must not sum 10,000).
    free_total: u64,
}

impl Pool {
    pub fn new(slots: Vec<Slot>) -> Pool {
        let free_total = slots.iter().map(|s| u64::from(s.free)).sum();
        Pool {
            free_total,
            slots,
            slab_load: 0.0,
            max_load: DEFAULT_MAX_LOAD,
            comfort: DEFAULT_COMFORT,
            by_use: None,
        }
    }

    /// Each slab placed on a donor adds `load` to its link's share in use.
    pub fn with_slab_load(mut self, load: f32) -> Pool {
        self.slab_load = load;
        self
    }

    /// Headroom is scored down only once a link is busier than `comfort` (0.0-0.99).
    pub fn with_comfort(mut self, comfort: f32) -> Pool {
        self.set_comfort(comfort);
        self
    }

    pub fn set_comfort(&mut self, comfort: f32) {
        self.comfort = comfort.clamp(0.0, 0.99);
    }

    /// Link-aware strategies keep every link at or below this share.
    pub fn with_max_load(mut self, max: f32) -> Pool {
        self.max_load = max;
        self
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn free_slabs(&self) -> u64 {
        self.free_total
    }

    /// Replaces one donor's figures (a heartbeat, a refreshed view).
    pub fn set(&mut self, i: usize, slot: Slot) {
        self.unindex(i);
        self.free_total = self.free_total - u64::from(self.slots[i].free) + u64::from(slot.free);
        self.slots[i] = slot;
        self.index(i);
    }

    /// Adds a donor; returns its index.
    pub fn push(&mut self, slot: Slot) -> usize {
        self.free_total += u64::from(slot.free);
        self.slots.push(slot);
        let i = self.slots.len() - 1;
        self.index(i);
        i
    }

    fn key(&self, i: usize) -> (u64, u32) {
        // Fixed point keeps the key totally ordered (no NaN) and exact enough to rank.
        (
            (self.slots[i].used_fraction() * (1u64 << 40) as f64) as u64,
            i as u32,
        )
    }

    fn index(&mut self, i: usize) {
        if self.by_use.is_some() {
            let k = self.key(i);
            if let Some(ix) = self.by_use.as_mut() {
                ix.insert(k);
            }
        }
    }

    fn unindex(&mut self, i: usize) {
        if self.by_use.is_some() {
            let k = self.key(i);
            if let Some(ix) = self.by_use.as_mut() {
                ix.remove(&k);
            }
        }
    }

    fn ensure_index(&mut self) {
        if self.by_use.is_none() {
            let ix = (0..self.slots.len()).map(|i| self.key(i)).collect();
            self.by_use = Some(ix);
        }
    }

    /// Takes one slab from donor `i` (and its share of the link).
    pub fn charge(&mut self, i: usize) {
        self.unindex(i);
        let s = &mut self.slots[i];
        s.free -= 1;
        s.load += self.slab_load;
        self.free_total -= 1;
        self.index(i);
    }

    fn refund(&mut self, i: usize) {
        self.unindex(i);
        let s = &mut self.slots[i];
        s.free += 1;
        s.load -= self.slab_load;
        self.free_total += 1;
        self.index(i);
    }

    /// How many failure domains have a donor with a free slab (a scan; for error reports).
    pub fn domains_with_free(&self) -> usize {
        let mut d: Vec<u32> = self
            .slots
            .iter()
            .filter(|s| s.free > 0)
            .map(|s| s.domain)
            .collect();
        d.sort_unstable();
        d.dedup();
        d.len()
    }

    /// Whether donor `i` can take one more slab for a chunk whose other replicas sit in `taken`.
    fn eligible(&self, i: usize, taken: &[u32], link_aware: bool) -> bool {
        let s = &self.slots[i];
        s.free > 0
            && !taken.contains(&s.domain)
            // The epsilon absorbs the float sum of many slab loads.
            && (!link_aware || s.load + self.slab_load <= self.max_load + 1e-5)
    }
}

/// Donors for each chunk, `replicas` per chunk, as pool indices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub replicas: usize,
    pub donors: Vec<u32>,
}

impl Plan {
    pub fn chunks(&self) -> usize {
        self.donors.len().checked_div(self.replicas).unwrap_or(0)
    }

    /// The donors of chunk `c`, first replica first.
    pub fn chunk(&self, c: usize) -> &[u32] {
        &self.donors[c * self.replicas..(c + 1) * self.replicas]
    }
}

/// Places chunks with one strategy and a seeded generator: the same seed, pool and requests
/// give the same plans.
#[derive(Debug, Clone)]
pub struct Chooser {
    strategy: Strategy,
    rng: SmallRng,
    /// Rotates the scan's ties, as rmem swap's own choice does.
    turn: usize,
}

impl Chooser {
    pub fn new(strategy: Strategy, seed: u64) -> Chooser {
        Chooser {
            strategy,
            rng: SmallRng::seed_from_u64(seed),
            turn: 0,
        }
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Places `chunks` chunks of `replicas` copies each and charges the pool; on error the pool
    /// is as it was.
    pub fn place(
        &mut self,
        pool: &mut Pool,
        chunks: usize,
        replicas: usize,
    ) -> Result<Plan, PlaceError> {
        if replicas == 0 || replicas > MAX_REPLICAS {
            return Err(PlaceError::Replicas {
                replicas,
                max: MAX_REPLICAS,
            });
        }
        let wanted = (chunks as u64) * replicas as u64;
        let free = pool.free_slabs();
        if wanted > free {
            return Err(PlaceError::Full { wanted, free });
        }
        if self.strategy == Strategy::LeastLoaded {
            pool.ensure_index();
        }
        let mut donors = Vec::with_capacity(chunks * replicas);
        let mut one = [0u32; MAX_REPLICAS];
        for c in 0..chunks {
            if self.pick(pool, &mut one[..replicas]).is_err() {
                for &i in &donors {
                    pool.refund(i as usize);
                }
                // Only now count domains (a scan): say why when the reason is too few of them.
                let domains = pool.domains_with_free();
                if domains < replicas {
                    return Err(PlaceError::TooFewDomains { replicas, domains });
                }
                return Err(PlaceError::NoDonor { chunk: c });
            }
            for &i in &one[..replicas] {
                pool.charge(i as usize);
                donors.push(i);
            }
        }
        Ok(Plan { replicas, donors })
    }

    /// Donors for one chunk's replicas (`out.len()` of them, in distinct domains) without
    /// charging the pool: a caller deciding on a view it does not own charges the truth itself.
    pub fn pick(&mut self, pool: &mut Pool, out: &mut [u32]) -> Result<(), PlaceError> {
        if out.is_empty() || out.len() > MAX_REPLICAS {
            return Err(PlaceError::Replicas {
                replicas: out.len(),
                max: MAX_REPLICAS,
            });
        }
        if self.strategy == Strategy::LeastLoaded {
            pool.ensure_index();
        }
        let mut domains = [0u32; MAX_REPLICAS];
        for r in 0..out.len() {
            let i = self
                .choose(pool, &domains[..r])
                .ok_or(PlaceError::NoDonor { chunk: 0 })?;
            out[r] = i as u32;
            domains[r] = pool.slots[i].domain;
        }
        self.turn = self.turn.wrapping_add(1);
        Ok(())
    }

    /// One donor for one replica, outside the domains in `taken`.
    pub fn choose(&mut self, pool: &Pool, taken: &[u32]) -> Option<usize> {
        let n = pool.len();
        if n == 0 {
            return None;
        }
        let aware = self.strategy.link_aware();
        match self.strategy {
            Strategy::Scan => scan(pool, taken, self.turn),
            Strategy::Random => self
                .sample(pool, taken, 1, aware, |_| 0.0)
                .or_else(|| best_by(pool, taken, aware, |s| s.score(pool.comfort))),
            Strategy::LeastLoaded => {
                let ix = pool.by_use.as_ref()?;
                ix.iter()
                    .map(|&(_, i)| i as usize)
                    .find(|&i| pool.eligible(i, taken, false))
            }
            Strategy::P2c => self
                .sample(pool, taken, 2, aware, |s| -(s.used_fraction() as f32))
                .or_else(|| best_by(pool, taken, aware, |s| s.free_fraction())),
            Strategy::Weighted { d } => self
                .sample(pool, taken, usize::from(d.max(1)), aware, |s| {
                    s.score(pool.comfort)
                })
                .or_else(|| best_by(pool, taken, aware, |s| s.score(pool.comfort))),
        }
    }

    /// The best of `want` eligible donors drawn at random, or None if the draws ran out first.
    fn sample(
        &mut self,
        pool: &Pool,
        taken: &[u32],
        want: usize,
        aware: bool,
        score: impl Fn(&Slot) -> f32,
    ) -> Option<usize> {
        let n = pool.len();
        if n <= 2 * want {
            // So few donors that sampling would often draw one twice: look at all of them.
            return None;
        }
        let mut best: Option<(f32, usize)> = None;
        let mut drawn = [usize::MAX; 8];
        let mut got = 0;
        for _ in 0..want * DRAWS_PER_SAMPLE {
            let i = self.rng.random_range(0..n);
            if !pool.eligible(i, taken, aware) || drawn[..got.min(8)].contains(&i) {
                continue;
            }
            if got < 8 {
                drawn[got] = i;
            }
            let s = score(&pool.slots[i]);
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, i));
            }
            got += 1;
            if got == want {
                break;
            }
        }
        best.map(|(_, i)| i)
    }
}

/// The most free slabs, ties rotated by `turn` (rmem swap's choice before placement).
fn scan(pool: &Pool, taken: &[u32], turn: usize) -> Option<usize> {
    let n = pool.len();
    (0..n)
        .filter(|&i| pool.eligible(i, taken, false))
        .max_by_key(|&i| (pool.slots[i].free, std::cmp::Reverse((i + turn) % n)))
}

/// The eligible donor with the highest score, by a full scan.
fn best_by(pool: &Pool, taken: &[u32], aware: bool, score: impl Fn(&Slot) -> f32) -> Option<usize> {
    let mut best: Option<(f32, usize)> = None;
    for i in 0..pool.len() {
        if pool.eligible(i, taken, aware) {
            let s = score(&pool.slots[i]);
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, i));
            }
        }
    }
    best.map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::Strategy;
    use super::*;
    use proptest::prelude::*;

    fn pool(sizes: &[u32], domains: u32) -> Pool {
        Pool::new(
            sizes
                .iter()
                .enumerate()
                .map(|(i, &t)| Slot::new(t, i as u32 % domains))
                .collect(),
        )
    }

    const ALL: [Strategy; 6] = [
        Strategy::Scan,
        Strategy::Random,
        Strategy::LeastLoaded,
        Strategy::P2c,
        Strategy::Weighted { d: 2 },
        Strategy::Weighted { d: 4 },
    ];

    #[test]
    fn strategies_parse_from_their_names() {
        for s in ALL {
            assert_eq!(s.to_string().parse::<Strategy>(), Ok(s));
        }
        assert!("weighted-d0".parse::<Strategy>().is_err());
        assert!("best".parse::<Strategy>().is_err());
    }

    #[test]
    fn too_many_replicas_for_the_domains_is_refused_and_charges_nothing() {
        let mut p = pool(&[10, 10, 10, 10], 2);
        let mut c = Chooser::new(Strategy::Weighted { d: 2 }, 1);
        assert_eq!(
            c.place(&mut p, 1, 3),
            Err(PlaceError::TooFewDomains {
                replicas: 3,
                domains: 2
            })
        );
        assert_eq!(p.free_slabs(), 40);
    }

    #[test]
    fn more_than_free_is_refused_and_charges_nothing() {
        let mut p = pool(&[3, 3], 2);
        let mut c = Chooser::new(Strategy::P2c, 1);
        assert_eq!(
            c.place(&mut p, 4, 2),
            Err(PlaceError::Full { wanted: 8, free: 6 })
        );
        assert_eq!(p.free_slabs(), 6);
    }

    #[test]
    fn a_placement_that_runs_out_midway_is_rolled_back() {
        // Enough slabs in total, but domain 1 holds only one: the second chunk's second replica
        // has nowhere to go.
        let mut p = pool(&[5, 1], 2);
        for s in ALL {
            let mut c = Chooser::new(s, 3);
            let e = c.place(&mut p, 2, 2).unwrap_err();
            assert_eq!(e, PlaceError::NoDonor { chunk: 1 }, "{s}");
            assert_eq!(p.free_slabs(), 6, "{s} left the pool charged");
        }
    }

    #[test]
    fn the_scan_fills_the_largest_donor_first_and_weighted_balances_utilization() {
        let mut scan_pool = pool(&[1000, 100], 2);
        Chooser::new(Strategy::Scan, 1)
            .place(&mut scan_pool, 100, 1)
            .unwrap();
        assert_eq!(
            scan_pool.slots()[1].free,
            100,
            "the scan never reached the small donor"
        );
        let mut w = pool(&[1000, 100], 2);
        Chooser::new(Strategy::Weighted { d: 2 }, 1)
            .place(&mut w, 550, 1)
            .unwrap();
        let used: Vec<f64> = w.slots().iter().map(|s| s.used_fraction()).collect();
        assert!((used[0] - used[1]).abs() < 0.05, "{used:?}");
    }

    #[test]
    fn link_aware_choice_keeps_links_under_the_limit() {
        let mut p = Pool::new(vec![
            Slot {
                load: 0.85,
                ..Slot::new(100, 0)
            },
            Slot::new(100, 1),
        ])
        .with_slab_load(0.01);
        Chooser::new(Strategy::Weighted { d: 2 }, 9)
            .place(&mut p, 95, 1)
            .unwrap();
        // Five slabs fit on the busy link, ninety on the idle one, then none anywhere.
        assert_eq!((p.slots()[0].free, p.slots()[1].free), (95, 10));
        assert!(
            p.slots().iter().all(|s| s.load <= 0.9 + 1e-5),
            "{:?}",
            p.slots()
        );
        let mut c = Chooser::new(Strategy::Weighted { d: 2 }, 9);
        assert_eq!(c.place(&mut p, 1, 1), Err(PlaceError::NoDonor { chunk: 0 }));
    }

    proptest! {
        #[test]
        fn plans_keep_capacity_domains_and_determinism(
            sizes in prop::collection::vec(0u32..40, 1..40),
            domains in 1u32..6,
            requests in prop::collection::vec((1usize..20, 1usize..4), 1..20),
            seed in any::<u64>(),
            strategy in prop::sample::select(ALL.to_vec()),
        ) {
            let mut a = pool(&sizes, domains);
            let mut b = a.clone();
            let mut ca = Chooser::new(strategy, seed);
            let mut cb = Chooser::new(strategy, seed);
            for &(chunks, replicas) in &requests {
                let before = a.free_slabs();
                let ra = ca.place(&mut a, chunks, replicas);
                let rb = cb.place(&mut b, chunks, replicas);
                prop_assert_eq!(&ra, &rb, "same seed, same plan");
                match ra {
                    Ok(plan) => {
                        prop_assert_eq!(plan.chunks(), chunks);
                        prop_assert_eq!(a.free_slabs(), before - (chunks * replicas) as u64);
                        for c in 0..chunks {
                            let mut ds: Vec<u32> =
                                plan.chunk(c).iter().map(|&i| a.slots()[i as usize].domain).collect();
                            ds.sort_unstable();
                            ds.dedup();
                            prop_assert_eq!(ds.len(), replicas, "two replicas in one domain");
                        }
                    }
                    Err(_) => prop_assert_eq!(a.free_slabs(), before),
                }
                for (s, &t) in a.slots().iter().zip(&sizes) {
                    prop_assert!(s.free <= t, "a donor over capacity");
                }
            }
        }
    }
}
