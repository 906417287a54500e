//! `rmem memcheck`: fill memory with checksummed pages and verify every page, pass after pass;
//! run it under a memory limit to push pages through swap (an rmem swap device, an NBD export)
//! and prove they come back intact.
//!
//! Under a memory limit the fill phase mostly pushes pages out (swap-out) and the verify phase
//! mostly faults them back in (swap-in), so each phase's throughput is reported on its own too.

use std::time::{Duration, Instant};

use clap::Args;

use super::parse_size;
use crate::exit::{Code, Failed};

const PAGE: usize = 4096;

#[derive(Args, Debug)]
pub struct MemcheckArgs {
    /// Memory to fill and verify.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    size: usize,
    /// Fill-and-verify passes (each with new contents).
    #[arg(long, default_value_t = 2)]
    passes: u32,
    /// Visit pages in a pseudo-random order instead of sequentially.
    #[arg(long)]
    random: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The 64-bit word `w` of page `p` in pass `seed`: every word differs, every pass differs.
fn word(seed: u64, p: u64, w: u64) -> u64 {
    let mut x =
        seed ^ p.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ w.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}

pub fn run(a: MemcheckArgs) -> Result<(), Failed> {
    let pages = a.size / PAGE;
    if pages == 0 || a.passes == 0 {
        return Err(Failed::new(
            Code::Usage,
            "--size must be at least one page and --passes at least 1",
        ));
    }
    let mut mem = vec![0u64; pages * PAGE / 8];
    let words = PAGE / 8;
    let order: Vec<usize> = if a.random {
        // A full-period LCG over the page count's next power of two, skipping the overshoot.
        let n = pages.next_power_of_two() as u64;
        let mut x = 1u64;
        let mut v = Vec::with_capacity(pages);
        for _ in 0..n {
            x = (x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407))
                & (n - 1);
            if (x as usize) < pages {
                v.push(x as usize);
            }
        }
        v
    } else {
        (0..pages).collect()
    };
    let start = Instant::now();
    let (mut fill, mut verify) = (Duration::ZERO, Duration::ZERO);
    let mut bad_pages = 0u64;
    for pass in 0..a.passes {
        let seed = 0x5eed_0000 + u64::from(pass);
        let phase = Instant::now();
        for &p in &order {
            for (w, slot) in mem[p * words..(p + 1) * words].iter_mut().enumerate() {
                *slot = word(seed, p as u64, w as u64);
            }
        }
        fill += phase.elapsed();
        let phase = Instant::now();
        for &p in &order {
            let ok = mem[p * words..(p + 1) * words]
                .iter()
                .enumerate()
                .all(|(w, v)| *v == word(seed, p as u64, w as u64));
            if !ok {
                bad_pages += 1;
                if bad_pages <= 10 {
                    eprintln!("rmem memcheck: page {p} differs in pass {pass}");
                }
            }
        }
        verify += phase.elapsed();
    }
    let secs = start.elapsed().as_secs_f64();
    // Each phase touches every page once per pass.
    let phase_mib = (pages * PAGE) as f64 * f64::from(a.passes) / 1_048_576.0;
    let touched = (pages * PAGE) as f64 * 2.0 * f64::from(a.passes);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "pages": pages, "passes": a.passes, "random": a.random,
                "bad_pages": bad_pages, "seconds": secs, "mib_per_sec": touched / secs / 1_048_576.0,
                "fill_seconds": fill.as_secs_f64(),
                "fill_mib_per_sec": phase_mib / fill.as_secs_f64(),
                "verify_seconds": verify.as_secs_f64(),
                "verify_mib_per_sec": phase_mib / verify.as_secs_f64(),
            })
        );
    } else {
        println!(
            "rmem memcheck: {pages} pages x {} passes ({}): {bad_pages} bad pages, {:.1} s, {:.0} MiB/s \
             (fill {:.0} MiB/s, verify {:.0} MiB/s)",
            a.passes,
            if a.random { "random" } else { "sequential" },
            secs,
            touched / secs / 1_048_576.0,
            phase_mib / fill.as_secs_f64(),
            phase_mib / verify.as_secs_f64()
        );
    }
    if bad_pages > 0 {
        return Err(Failed::new(
            Code::Verify,
            format!("{bad_pages} pages came back different"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_differ_across_pages_words_and_passes() {
        assert_ne!(word(1, 0, 0), word(1, 1, 0));
        assert_ne!(word(1, 0, 0), word(1, 0, 1));
        assert_ne!(word(1, 0, 0), word(2, 0, 0));
    }
}
