//! A seeded simulation of donor choice at cluster scale: how evenly each strategy fills donors
//! and links, and what a decision costs.
//!
//! Two worlds: homogeneous (every donor 240 slabs, idle links) and heterogeneous (64 to 512
//! slabs, links already 0-70% busy, each slab adding its share of traffic). Two views: fresh
//! (each decision sees the last) and stale (decisions read a copy of the loads refreshed every
//! `refresh` decisions, as a placement fed by heartbeats, or several placements, would; a
//! decision the truth can no longer take is a conflict and is made again with that donor marked
//! full). Per-decision latency comes from every 16th decision, each timed alone; the batch
//! figure divides each `refresh`-decision batch's wall time by its size.

use std::time::Instant;

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::choice::{Chooser, Pool, Slot, Strategy, MAX_REPLICAS};

/// Which cluster is simulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum World {
    Homogeneous,
    Heterogeneous,
}

impl std::str::FromStr for World {
    type Err = String;
    fn from_str(s: &str) -> Result<World, String> {
        match s {
            "homogeneous" => Ok(World::Homogeneous),
            "heterogeneous" => Ok(World::Heterogeneous),
            _ => Err(format!("unknown world {s:?}: homogeneous or heterogeneous")),
        }
    }
}

/// Whether decisions see their own effects at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    Fresh,
    Stale,
}

impl std::str::FromStr for View {
    type Err = String;
    fn from_str(s: &str) -> Result<View, String> {
        match s {
            "fresh" => Ok(View::Fresh),
            "stale" => Ok(View::Stale),
            _ => Err(format!("unknown view {s:?}: fresh or stale")),
        }
    }
}

/// One simulated run.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    pub world: World,
    pub view: View,
    pub replicas: usize,
    pub strategy: Strategy,
    pub donors: usize,
    pub racks: u32,
    pub decisions: u64,
    /// Decisions between refreshes of a stale view (and per timed batch).
    pub refresh: u64,
    pub seed: u64,
    /// Link use below which headroom is not scored down.
    pub comfort: f32,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub world: World,
    pub view: View,
    pub replicas: usize,
    pub strategy: String,
    pub donors: usize,
    pub decisions: u64,
    /// Decisions that found no donor at all.
    pub refused: u64,
    /// Choices the truth could not take (stale views only).
    pub conflicts: u64,
    pub decision_p50_ns: u64,
    pub decision_p99_ns: u64,
    pub batch_p50_ns: u64,
    pub batch_p99_ns: u64,
    pub util_mean: f64,
    pub util_max: f64,
    pub max_over_mean: f64,
    pub util_stddev: f64,
    pub jain: f64,
    pub donors_full: usize,
    pub links_over_90: usize,
    pub seconds: f64,
}

/// Slab traffic in the heterogeneous world: a donor at its mean fill adds about 30% to its link.
const HET_SLAB_LOAD: f32 = 0.3 / 288.0;
const TIME_EVERY: u64 = 16;
const RETRIES: usize = 4;

/// The starting cluster of a world.
pub fn world(world: World, donors: usize, racks: u32, seed: u64) -> Pool {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x05ee_d0fd_00e5);
    let racks = racks.max(1);
    match world {
        World::Homogeneous => Pool::new(
            (0..donors)
                .map(|i| Slot::new(240, i as u32 % racks))
                .collect(),
        ),
        World::Heterogeneous => Pool::new(
            (0..donors)
                .map(|i| Slot {
                    load: rng.random_range(0.0..0.7),
                    ..Slot::new(rng.random_range(64..=512), i as u32 % racks)
                })
                .collect(),
        )
        .with_slab_load(HET_SLAB_LOAD),
    }
}

/// Whether the truth can take one more slab on donor `i` for this strategy.
fn takes(truth: &Pool, i: usize, aware: bool, max_load: f32, slab_load: f32) -> bool {
    let s = truth.slots()[i];
    s.free > 0 && (!aware || s.load + slab_load <= max_load + 1e-5)
}

/// Runs one setup to the end.
pub fn run(s: &Setup) -> Row {
    let started = Instant::now();
    let mut truth = world(s.world, s.donors, s.racks, s.seed).with_comfort(s.comfort);
    let slab_load = if s.world == World::Heterogeneous {
        HET_SLAB_LOAD
    } else {
        0.0
    };
    let aware = s.strategy.link_aware();
    let mut view = truth.clone();
    let mut chooser = Chooser::new(s.strategy, s.seed);
    let mut each = Histogram::<u64>::new(3).expect("3 significant figures is valid");
    let mut batch = Histogram::<u64>::new(3).expect("3 significant figures is valid");
    let replicas = s.replicas.clamp(1, MAX_REPLICAS);
    let mut out = [0u32; MAX_REPLICAS];
    let (mut refused, mut conflicts) = (0u64, 0u64);
    let refresh = s.refresh.max(1);
    let mut batch_start = Instant::now();
    for k in 0..s.decisions {
        if k % refresh == 0 {
            if k > 0 {
                let per = batch_start.elapsed().as_nanos() as u64 / refresh;
                let _ = batch.record(per.max(1));
            }
            if s.view == View::Stale {
                view = truth.clone();
            }
            batch_start = Instant::now();
        }
        let mut placed = false;
        for _ in 0..RETRIES {
            let pool = match s.view {
                View::Fresh => &mut truth,
                View::Stale => &mut view,
            };
            let got = if k % TIME_EVERY == 0 {
                let t = Instant::now();
                let got = chooser.pick(pool, &mut out[..replicas]);
                let _ = each.record((t.elapsed().as_nanos() as u64).max(1));
                got
            } else {
                chooser.pick(pool, &mut out[..replicas])
            };
            if got.is_err() {
                break;
            }
            let bad: Vec<usize> = out[..replicas]
                .iter()
                .map(|&i| i as usize)
                .filter(|&i| !takes(&truth, i, aware, crate::choice::DEFAULT_MAX_LOAD, slab_load))
                .collect();
            if bad.is_empty() {
                for &i in &out[..replicas] {
                    truth.charge(i as usize);
                }
                placed = true;
                break;
            }
            conflicts += 1;
            for i in bad {
                // The donor (or its link) is full in truth: the view learns it.
                let mut slot = truth.slots()[i];
                slot.free = 0;
                view.set(i, slot);
            }
        }
        if !placed {
            refused += 1;
        }
    }
    let u: Vec<f64> = truth
        .slots()
        .iter()
        .map(|s| f64::from(s.total - s.free) / f64::from(s.total.max(1)))
        .collect();
    let n = u.len().max(1) as f64;
    let mean = u.iter().sum::<f64>() / n;
    let max = u.iter().copied().fold(0.0, f64::max);
    let var = u.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let sq = u.iter().map(|x| x * x).sum::<f64>();
    Row {
        world: s.world,
        view: s.view,
        replicas,
        strategy: s.strategy.to_string(),
        donors: s.donors,
        decisions: s.decisions,
        refused,
        conflicts,
        decision_p50_ns: each.value_at_quantile(0.5),
        decision_p99_ns: each.value_at_quantile(0.99),
        batch_p50_ns: batch.value_at_quantile(0.5),
        batch_p99_ns: batch.value_at_quantile(0.99),
        util_mean: mean,
        util_max: max,
        max_over_mean: if mean > 0.0 { max / mean } else { 0.0 },
        util_stddev: var.sqrt(),
        jain: if sq > 0.0 {
            u.iter().sum::<f64>().powi(2) / (n * sq)
        } else {
            1.0
        },
        donors_full: truth.slots().iter().filter(|s| s.free == 0).count(),
        links_over_90: truth
            .slots()
            .iter()
            .filter(|s| s.load > crate::choice::DEFAULT_MAX_LOAD + 1e-5)
            .count(),
        seconds: started.elapsed().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(world: World, view: View, strategy: Strategy) -> Setup {
        Setup {
            world,
            view,
            replicas: 2,
            strategy,
            donors: 1000,
            racks: 20,
            decisions: 100_000,
            refresh: 1000,
            seed: 42,
            comfort: crate::choice::DEFAULT_COMFORT,
        }
    }

    #[test]
    fn weighted_choice_balances_where_random_does_not() {
        let w = run(&setup(
            World::Homogeneous,
            View::Fresh,
            Strategy::Weighted { d: 2 },
        ));
        let r = run(&setup(World::Homogeneous, View::Fresh, Strategy::Random));
        assert_eq!((w.refused, r.refused), (0, 0));
        assert!(w.max_over_mean < 1.1, "{w:?}");
        assert!(r.max_over_mean > w.max_over_mean + 0.1, "{r:?} vs {w:?}");
        assert!(w.jain > 0.999, "{w:?}");
    }

    #[test]
    fn a_stale_view_makes_least_loaded_herd_and_not_weighted() {
        let ll = run(&setup(
            World::Homogeneous,
            View::Stale,
            Strategy::LeastLoaded,
        ));
        let w = run(&setup(
            World::Homogeneous,
            View::Stale,
            Strategy::Weighted { d: 2 },
        ));
        assert!(
            ll.donors_full > 10 * w.donors_full.max(1),
            "{ll:?} vs {w:?}"
        );
        assert!(w.max_over_mean < 1.1, "{w:?}");
    }

    #[test]
    fn only_link_aware_choice_keeps_links_under_ninety_percent() {
        let w = run(&setup(
            World::Heterogeneous,
            View::Fresh,
            Strategy::Weighted { d: 2 },
        ));
        let p = run(&setup(World::Heterogeneous, View::Fresh, Strategy::P2c));
        assert_eq!(w.links_over_90, 0, "{w:?}");
        assert!(p.links_over_90 > 0, "{p:?}");
    }

    #[test]
    fn runs_are_deterministic_under_a_seed() {
        let a = run(&setup(
            World::Heterogeneous,
            View::Stale,
            Strategy::Weighted { d: 4 },
        ));
        let b = run(&setup(
            World::Heterogeneous,
            View::Stale,
            Strategy::Weighted { d: 4 },
        ));
        assert_eq!(
            (a.util_max, a.conflicts, a.donors_full),
            (b.util_max, b.conflicts, b.donors_full)
        );
    }
}
