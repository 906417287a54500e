//! Driving the source's QEMU (or process) around a migration: its settings saved and put
//! back, its run state, the pause, and QEMU's own migration awaited.

use super::*;

/// The capabilities rmem turns on or off (`names`) and the parameters it sets, as they are now.
pub(super) fn saved_settings(
    q: &mut Control,
    names: &[String],
) -> Result<(Vec<(String, bool)>, Value), MigrateError> {
    let caps = q.execute("query-migrate-capabilities", None)?;
    let state = |name: &str| {
        caps.as_array()
            .and_then(|a| {
                a.iter()
                    .find(|c| c.get("capability").and_then(Value::as_str) == Some(name))
            })
            .and_then(|c| c.get("state").and_then(Value::as_bool))
            .unwrap_or(false)
    };
    let caps = names.iter().map(|n| (n.clone(), state(n))).collect();
    let p = q.execute("query-migrate-parameters", None)?;
    let mut params = json!({});
    for k in ["downtime-limit", "max-bandwidth"] {
        if let Some(v) = p.get(k) {
            params[k] = v.clone();
        }
    }
    Ok((caps, params))
}

/// Puts the source back as it was before the migration.
pub(super) fn restore(q: &mut Control, undo: &Undo) {
    if undo.migrating {
        let _ = q.execute("migrate_cancel", None);
        // Cancelling settles asynchronously; resume only once QEMU left the migration.
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            match q.execute("query-migrate", None) {
                Ok(v) if v.get("status").and_then(Value::as_str) == Some("cancelling") => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => break,
            }
        }
    }
    // After the cancel: QEMU refuses to change settings while a migration runs.
    restore_settings(q, undo);
    if undo.was_running {
        // Cancelling a QEMU-driven migration resumes the guest by itself; `cont` on a running
        // guest is harmless.
        if let Ok(s) = q.status() {
            if s != "running" {
                if let Err(e) = q.execute("cont", None) {
                    tracing::error!(error = %e, "could not resume the source guest");
                }
            }
        }
    }
}

/// Puts QEMU's migration capabilities and parameters back as they were: a later migration
/// (by rmem or anyone) must not inherit rmem's, above all not pause-before-switchover, which
/// would hold it at the switch-over for a `migrate-continue` nobody sends.
pub(super) fn restore_settings(q: &mut Control, undo: &Undo) {
    if let Some((caps, params)) = &undo.saved {
        for (name, on) in caps {
            if let Err(e) = set_capability(q, name, *on) {
                tracing::warn!(capability = %name, error = %e, "could not put a QEMU capability back");
            }
        }
        let _ = q.execute("migrate-set-parameters", Some(params.clone()));
    }
}

pub(super) fn set_capability(q: &mut Control, name: &str, on: bool) -> Result<(), MigrateError> {
    q.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": name, "state": on}]})),
    )?;
    Ok(())
}

/// Pauses the source (if it runs); returns when.
pub(super) fn pause(q: &mut Control, undo: &mut Undo) -> Result<Instant, MigrateError> {
    let at = Instant::now();
    if undo.was_running {
        q.execute("stop", None)?;
        undo.paused_by_us = true;
    }
    Ok(at)
}

/// QEMU sources: starts QEMU's migration (device state only) with the guest still running;
/// QEMU sets it up, stops the guest itself and, with `hold` (pause-before-switchover), waits
/// for `migrate-continue`; without, it goes on with the device state at once. So QEMU's setup
/// (its connection, thread and first pass over the small RAM blocks that are not shared)
/// stays out of the pause. Returns once the guest stopped: the relay, when the migration
/// started and when the guest stopped (by the timestamp of QEMU's STOP event).
pub(super) fn migrate_to_pause(
    q: &mut Control,
    peer: &Peer,
    opts: &SendOptions,
    undo: &mut Undo,
    cancel: &AtomicBool,
    hold: bool,
) -> Result<(Relay, Instant, Instant), MigrateError> {
    let (relay, started) = start_device_state(q, peer, opts, undo)?;
    let Some(qmp) = q.qmp() else {
        return Err(MigrateError::Protocol("no QEMU to pause the guest".into()));
    };
    let waiting = Instant::now();
    let paused = if hold { "pre-switchover" } else { "stopped" };
    let pre = |m: &Value| match m.get("event").and_then(Value::as_str) {
        Some("MIGRATION") => matches!(
            m.pointer("/data/status").and_then(Value::as_str),
            Some("pre-switchover" | "failed" | "cancelled")
        ),
        Some("STOP") => !hold,
        _ => false,
    };
    let stop = loop {
        if cancel.load(Ordering::Acquire) {
            return Err(MigrateError::Cancelled);
        }
        if let Some(why) = peer.pipe.failure() {
            return Err(PipeError::Failed(why).into());
        }
        // Short waits: a cancel or a lost peer is seen within one.
        if let Some(ev) = qmp.wait_event(pre, Duration::from_millis(20))? {
            let status = match ev.get("event").and_then(Value::as_str) {
                Some("STOP") => Some("stopped"),
                _ => ev.pointer("/data/status").and_then(Value::as_str),
            };
            if status != Some(paused) {
                let v = qmp.execute("query-migrate", None)?;
                let why = v
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(MigrateError::Qemu(format!(
                    "QEMU's migration ended before the switch-over: {why}"
                )));
            }
            break (!hold).then_some(ev);
        }
        if waiting.elapsed() > opts.timeouts.reply {
            return Err(MigrateError::Qemu(format!(
                "QEMU did not stop the guest for the switch-over within {:?}",
                opts.timeouts.reply
            )));
        }
    };
    undo.paused_by_us = undo.was_running;
    // A guest already paused has no STOP event: its pause began before the migration.
    let now = Instant::now();
    let stop = match stop {
        Some(ev) => Some(ev),
        None => qmp.wait_event(
            |m| m.get("event").and_then(Value::as_str) == Some("STOP"),
            Duration::ZERO,
        )?,
    };
    let at = stop
        .and_then(|m| event_age(&m))
        .and_then(|age| now.checked_sub(age))
        .unwrap_or(now);
    Ok((relay, started, at))
}

/// How long ago QEMU emitted `event`, by the wall-clock timestamp it carries.
fn event_age(event: &Value) -> Option<Duration> {
    let s = event.pointer("/timestamp/seconds")?.as_u64()?;
    let us = event.pointer("/timestamp/microseconds")?.as_u64()?;
    let at = std::time::UNIX_EPOCH + Duration::from_secs(s) + Duration::from_micros(us);
    std::time::SystemTime::now().duration_since(at).ok()
}

/// Waits for QEMU's side of the migration to finish, relaying meanwhile.
pub(super) fn wait_migrated(
    q: &mut Control,
    opts: &SendOptions,
    cancel: &AtomicBool,
    relay: &Relay,
    pipe: &Pipe,
    progress: &mut dyn FnMut(Progress),
) -> Result<Value, MigrateError> {
    let t = Instant::now();
    let mut shown = 0;
    loop {
        if cancel.load(Ordering::Acquire) {
            return Err(MigrateError::Cancelled);
        }
        if let Some(why) = pipe.failure() {
            return Err(PipeError::Failed(why).into());
        }
        let v = q.execute("query-migrate", None)?;
        match v.get("status").and_then(Value::as_str).unwrap_or("") {
            "completed" => return Ok(v),
            "failed" | "cancelled" => {
                // The relay shut QEMU's socket because the other agent went away: say so.
                if relay.lost() {
                    let why = pipe
                        .failure()
                        .unwrap_or_else(|| "the relay lost the other agent".into());
                    return Err(PipeError::Failed(why).into());
                }
                let why = v
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(MigrateError::Qemu(why.to_string()));
            }
            _ => {}
        }
        if t.elapsed() > opts.timeouts.total {
            return Err(MigrateError::Qemu(format!(
                "not finished after {:?}",
                opts.timeouts.total
            )));
        }
        let b = relay.bytes();
        if b >= shown + (8 << 20) {
            shown = b;
            progress(Progress::Stream { bytes: b });
        }
        // The guest is paused while QEMU finishes: poll often (a QMP round trip is cheap).
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Page modes: waits for the destination to say it loaded the device state, which ends the
/// pause sooner than QEMU's own "completed" on this side would. QEMU failing or cancelling
/// here, a cancel, or the time running out end the wait with an error.
pub(super) fn wait_loaded(
    q: &mut Control,
    opts: &SendOptions,
    cancel: &AtomicBool,
    peer: &Peer,
) -> Result<(), MigrateError> {
    let t = Instant::now();
    let mut asked = Instant::now();
    loop {
        if cancel.load(Ordering::Acquire) {
            return Err(MigrateError::Cancelled);
        }
        match peer.recv(Duration::from_millis(1)) {
            Ok(Msg::Loaded { .. }) => return Ok(()),
            Ok(m) => return Err(unexpected("loaded", &m)),
            Err(MigrateError::Peer(PipeError::Timeout(_))) => {}
            Err(e) => return Err(e),
        }
        if asked.elapsed() >= Duration::from_millis(5) {
            asked = Instant::now();
            let v = q.execute("query-migrate", None)?;
            if let Some(st @ ("failed" | "cancelled")) = v.get("status").and_then(Value::as_str) {
                let why = v
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(MigrateError::Qemu(format!("QEMU's migration {st}: {why}")));
            }
        }
        if t.elapsed() > opts.timeouts.total {
            return Err(MigrateError::Qemu(format!(
                "the destination did not load the device state within {:?}",
                opts.timeouts.total
            )));
        }
    }
}
