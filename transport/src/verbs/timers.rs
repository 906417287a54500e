//! Retry and timeout settings of a queue pair, derived from [`crate::QpCaps`] durations.

use std::time::Duration;

/// RNR NAK timer values of IBA table 45 in microseconds; the index is the 5-bit code.
const RNR_TIMER_US: [u32; 32] = [
    655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1_280, 1_920, 2_560, 3_840,
    5_120, 7_680, 10_240, 15_360, 20_480, 30_720, 40_960, 61_440, 81_920, 122_880, 163_840,
    245_760, 327_680, 491_520,
];

/// Receiver-not-ready settings for a total wait of about `total`: the timer code the peer should
/// advertise (it is the responder's `min_rnr_timer`) and our retry count. A retry count of 7 means
/// "retry for ever", so at most 6 retries are used.
pub(crate) fn rnr_settings(total: Duration) -> (u8, u8) {
    const RETRY: u8 = 6;
    let per_try = total.as_micros() / u128::from(RETRY + 1);
    let code = (0..32usize)
        .filter(|&c| u128::from(RNR_TIMER_US[c]) <= per_try)
        .max_by_key(|&c| RNR_TIMER_US[c])
        .unwrap_or(1);
    (code as u8, RETRY)
}

/// Local ACK timeout exponent and retry count for a total of about `total`: the device waits
/// 4.096 us * 2^timeout for each try and tries `retry_cnt + 1` times.
///
/// The IBA allows a retry count of 7, but rxe treats 7 as "retry for ever" (as the spec does
/// only for the RNR retry count), so a dead peer would never be noticed there: 6 at most.
pub(crate) fn ack_timeout_settings(total: Duration) -> (u8, u8) {
    const RETRY: u8 = 6;
    let per_try_us = total.as_secs_f64() * 1e6 / f64::from(RETRY + 1);
    let exp = (per_try_us / 4.096).max(1.0).log2().round();
    // 0 would mean "wait for ever".
    (exp.clamp(1.0, 31.0) as u8, RETRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rnr_settings_stay_finite_and_close() {
        let (code, retry) = rnr_settings(Duration::from_millis(200));
        assert!(retry < 7, "7 retries means infinite");
        let total = u64::from(RNR_TIMER_US[code as usize]) * u64::from(retry + 1);
        assert!((100_000..=200_000).contains(&total), "{total} us");
        let (code, _) = rnr_settings(Duration::from_secs(2));
        assert_eq!(RNR_TIMER_US[code as usize], 245_760);
        let (code, _) = rnr_settings(Duration::from_secs(60));
        assert_eq!(code, 0, "the longest timer is code 0 (655 ms)");
        let (code, _) = rnr_settings(Duration::ZERO);
        assert_eq!(code, 1);
    }

    #[test]
    fn ack_timeout_matches_the_op_timeout() {
        for ms in [100u64, 500, 4000, 30_000] {
            let (t, retry) = ack_timeout_settings(Duration::from_millis(ms));
            assert_eq!(retry, 6, "7 means infinite on rxe");
            let total_ms = 4.096e-3 * f64::from(1u32 << t) * f64::from(retry + 1);
            let ratio = total_ms / ms as f64;
            assert!(
                (0.7..1.45).contains(&ratio),
                "{ms} ms -> t={t}: {total_ms} ms"
            );
        }
        assert_eq!(ack_timeout_settings(Duration::ZERO).0, 1);
        assert_eq!(ack_timeout_settings(Duration::from_secs(1 << 40)).0, 31);
    }
}
