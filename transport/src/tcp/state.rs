//! The life of a `tcp` queue pair as one value: ready to carry work, or failed with the status
//! its first failed request completes with. Both halves read it on every post and every
//! response, so it lives in one atomic word rather than behind a lock.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::WcStatus;

/// Where a queue pair is in its life. The only transition is `Ready -> Error`, once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QpState {
    /// Connected: posts go out, responses and the peer's requests are served (RTS).
    Ready,
    /// Failed: both connections are shut down; the first outstanding request completed (or
    /// completes) with `first`, everything else with `WrFlushErr` (ERR).
    Error { first: WcStatus },
}

/// A [`QpState`] in one atomic word: 0 is `Ready`, `1 + status` is `Error`.
pub(crate) struct StateCell(AtomicU32);

const READY: u32 = 0;

impl StateCell {
    pub(crate) fn new() -> StateCell {
        StateCell(AtomicU32::new(READY))
    }

    pub(crate) fn get(&self) -> QpState {
        match self.0.load(Ordering::Acquire) {
            READY => QpState::Ready,
            v => QpState::Error {
                first: WcStatus::from_raw(v - 1),
            },
        }
    }

    pub(crate) fn is_failed(&self) -> bool {
        self.0.load(Ordering::Acquire) != READY
    }

    /// Moves `Ready -> Error { first: status }`. Returns false (and changes nothing) if the
    /// queue pair had already failed: the first failure decides the status.
    pub(crate) fn fail(&self, status: WcStatus) -> bool {
        let v = status as u32 + 1;
        self.0
            .compare_exchange(READY, v, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_ready_and_fails_once_with_the_first_status() {
        let s = StateCell::new();
        assert_eq!(s.get(), QpState::Ready);
        assert!(!s.is_failed());
        assert!(s.fail(WcStatus::RemAccessErr));
        assert_eq!(
            s.get(),
            QpState::Error {
                first: WcStatus::RemAccessErr
            }
        );
        // A later failure changes nothing: there is no way back to Ready, nor a second error.
        assert!(!s.fail(WcStatus::RetryExcErr));
        assert!(!s.fail(WcStatus::Success));
        assert_eq!(
            s.get(),
            QpState::Error {
                first: WcStatus::RemAccessErr
            }
        );
    }

    #[test]
    fn every_status_survives_the_encoding() {
        for st in [
            WcStatus::Success,
            WcStatus::WrFlushErr,
            WcStatus::RetryExcErr,
            WcStatus::BadRespErr,
            WcStatus::RemAccessErr,
            WcStatus::RemInvReqErr,
            WcStatus::RnrRetryExcErr,
        ] {
            let s = StateCell::new();
            assert!(s.fail(st));
            assert_eq!(s.get(), QpState::Error { first: st });
        }
    }

    #[test]
    fn racing_failures_pick_exactly_one() {
        let s = std::sync::Arc::new(StateCell::new());
        let wins: usize = (0..8)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let st = if i % 2 == 0 {
                        WcStatus::RetryExcErr
                    } else {
                        WcStatus::BadRespErr
                    };
                    usize::from(s.fail(st))
                })
            })
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(wins, 1);
        assert!(s.is_failed());
    }
}
