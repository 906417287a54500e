//! The phases of one migration and the only legal ways between them.
//!
//! ```text
//!   Setup --start--> PreCopy{1} --round done--> PreCopy{n+1}
//!     |                 |   \
//!     | stop            |    `--switch--> PostCopy --all sent--> Done
//!     v                 v                    |
//!   StopAndCopy <----stop                    | abort / peer lost
//!     |     \                                v
//!     |      `--device state--> Handover --> Failed   (destination stopped; never runs on
//!     |                            |  abort / lost    missing pages; or it may run: the
//!     `--all sent--> Done <--------'                  source stays paused either way)
//!                          all sent
//!   Setup, PreCopy, StopAndCopy --abort / peer lost--> Aborted   (the source runs on, or
//!                                                                 stays paused, memory intact)
//!   any of those and Handover, PostCopy --not started--> Aborted (the destination's QEMU is
//!                                                         gone and never ran the guest)
//! ```
//!
//! Before switchover the source still owns the guest, so any failure is an abort that leaves it
//! as it was. After switchover (post-copy) the destination runs and the source only serves
//! pages: losing either side fails the migration, and the destination must stop. A stopped
//! copy hands over when QEMU's device state leaves for a destination that starts the guest
//! as soon as it has loaded it: from then the source cannot know the guest is not running
//! there, so it stays paused whatever happens (as QEMU's own migration does).

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Regions registered, sizes and layouts compared, nothing paused.
    Setup,
    /// Copying while the source runs; `round` 1 sends every non-zero page.
    PreCopy { round: u32 },
    /// The source is stopped; the last dirty pages and the device state go.
    StopAndCopy,
    /// Every page is there and the device state is on its way: the destination may run at
    /// any moment.
    Handover,
    /// The destination runs; its faults are served first, a background pass sends the rest.
    PostCopy,
    /// The destination has every page and has said so.
    Done,
    /// Ended before switchover: the source is as it was.
    Aborted,
    /// Ended after switchover without every page: the destination is stopped with an error.
    Failed,
}

/// What happens to a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Setup finished; copying starts with the source running.
    Start,
    /// A pre-copy round finished and another is wanted.
    RoundDone,
    /// The source stops (stop-copy mode, or pre-copy converged).
    Stop,
    /// The destination takes over with pages missing (post-copy or hybrid).
    SwitchToPostCopy,
    /// A stopped copy sends the device state to a destination that runs once it is loaded.
    DeviceState,
    /// The destination has acknowledged every page.
    AllSent,
    /// The operator cancelled, or a check failed.
    Abort,
    /// The peer, or the connection to it, is gone.
    PeerLost,
    /// The destination's QEMU is gone and never ran the guest: whatever was handed over,
    /// the source still owns it.
    NotStarted,
}

impl Phase {
    /// Its name in progress reports and `--json`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::PreCopy { .. } => "precopy",
            Phase::StopAndCopy => "stop-and-copy",
            Phase::Handover => "handover",
            Phase::PostCopy => "postcopy",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
            Phase::Failed => "failed",
        }
    }

    /// Migration is over, one way or the other.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Aborted | Phase::Failed)
    }

    /// The guest runs on the destination (or will, once the last pages are there).
    pub fn switched_over(self) -> bool {
        matches!(
            self,
            Phase::Handover | Phase::PostCopy | Phase::Done | Phase::Failed
        )
    }
}

/// The one table of legal moves.
pub fn next(from: Phase, event: Event) -> Option<Phase> {
    use Event::*;
    use Phase::*;
    Some(match (from, event) {
        (Setup, Start) => PreCopy { round: 1 },
        (Setup | PreCopy { .. }, Stop) => StopAndCopy,
        (Setup | PreCopy { .. }, SwitchToPostCopy) => PostCopy,
        (PreCopy { round }, RoundDone) => PreCopy {
            round: round.checked_add(1)?,
        },
        (StopAndCopy, DeviceState) => Handover,
        (StopAndCopy | Handover | PostCopy, AllSent) => Done,
        (Setup | PreCopy { .. } | StopAndCopy, Abort | PeerLost) => Aborted,
        (Handover | PostCopy, Abort | PeerLost) => Failed,
        (Setup | PreCopy { .. } | StopAndCopy | Handover | PostCopy, NotStarted) => Aborted,
        _ => return None,
    })
}

/// A move the table does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a migration in phase {from:?} cannot take {event:?}")]
pub struct IllegalMove {
    pub from: Phase,
    pub event: Event,
}

/// One migration's phase, changed only through [`next`].
#[derive(Debug)]
pub struct Phases {
    now: Phase,
}

impl Default for Phases {
    fn default() -> Self {
        Phases { now: Phase::Setup }
    }
}

impl Phases {
    pub fn now(&self) -> Phase {
        self.now
    }

    /// Takes `event`, or refuses it and stays where it is.
    pub fn take(&mut self, event: Event) -> Result<Phase, IllegalMove> {
        let to = next(self.now, event).ok_or(IllegalMove {
            from: self.now,
            event,
        })?;
        self.now = to;
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHASES: [Phase; 8] = [
        Phase::Setup,
        Phase::PreCopy { round: 3 },
        Phase::StopAndCopy,
        Phase::Handover,
        Phase::PostCopy,
        Phase::Done,
        Phase::Aborted,
        Phase::Failed,
    ];
    const EVENTS: [Event; 9] = [
        Event::Start,
        Event::RoundDone,
        Event::Stop,
        Event::SwitchToPostCopy,
        Event::DeviceState,
        Event::AllSent,
        Event::Abort,
        Event::PeerLost,
        Event::NotStarted,
    ];

    #[test]
    fn every_mode_runs_its_course() {
        use Event::*;
        let run = |events: &[Event]| {
            let mut p = Phases::default();
            for &e in events {
                p.take(e).unwrap();
            }
            p.now()
        };
        assert_eq!(run(&[Stop, AllSent]), Phase::Done, "stop-copy");
        assert_eq!(
            run(&[Stop, DeviceState, AllSent]),
            Phase::Done,
            "stop-copy, QEMU"
        );
        assert_eq!(
            run(&[Start, RoundDone, Stop, DeviceState, AllSent]),
            Phase::Done,
            "pre-copy, QEMU"
        );
        assert_eq!(
            run(&[Start, RoundDone, Stop, AllSent]),
            Phase::Done,
            "pre-copy"
        );
        assert_eq!(run(&[SwitchToPostCopy, AllSent]), Phase::Done, "post-copy");
        assert_eq!(
            run(&[Start, RoundDone, RoundDone, SwitchToPostCopy, AllSent]),
            Phase::Done,
            "hybrid"
        );
        assert_eq!(run(&[Start, RoundDone]), Phase::PreCopy { round: 2 });
    }

    #[test]
    fn failures_before_switchover_abort_and_after_it_fail() {
        for from in PHASES.iter().filter(|p| !p.is_final()) {
            for e in [Event::Abort, Event::PeerLost] {
                let to = next(*from, e).unwrap();
                if from.switched_over() {
                    assert_eq!(to, Phase::Failed, "{from:?}");
                } else {
                    assert_eq!(to, Phase::Aborted, "{from:?}");
                }
            }
        }
    }

    #[test]
    fn final_phases_take_nothing_and_illegal_moves_change_nothing() {
        for from in PHASES.iter().filter(|p| p.is_final()) {
            for e in EVENTS {
                assert_eq!(next(*from, e), None, "{from:?} took {e:?}");
            }
        }
        let mut p = Phases::default();
        assert_eq!(
            p.take(Event::AllSent),
            Err(IllegalMove {
                from: Phase::Setup,
                event: Event::AllSent
            })
        );
        assert_eq!(p.now(), Phase::Setup);
        p.take(Event::Stop).unwrap();
        assert!(
            p.take(Event::SwitchToPostCopy).is_err(),
            "stopped copies cannot go post-copy"
        );
        assert!(p.take(Event::RoundDone).is_err());
        assert_eq!(p.now(), Phase::StopAndCopy);
    }

    #[test]
    fn the_table_has_exactly_the_documented_moves() {
        let legal = PHASES
            .iter()
            .flat_map(|f| EVENTS.iter().filter(move |e| next(*f, **e).is_some()))
            .count();
        // Setup: start, stop, switch, abort, lost; PreCopy: round, stop, switch, abort, lost;
        // StopAndCopy: handover, all sent, abort, lost; Handover: all sent, abort, lost;
        // PostCopy: all sent, abort, lost; and from each of these five, not started.
        assert_eq!(legal, 25);
    }
}
