//! How `plait serve` meets whatever supervises it: signals, and systemd's notify protocol
//! (`Type=notify`; see `server/deploy/plait.service`).
//!
//! * **SIGINT, SIGTERM**: a graceful stop (the shutdown token: subscriptions end with a
//!   reconnect hint, writes in flight finish, the store is flushed); systemd is told
//!   `STOPPING=1`.
//! * **SIGHUP**: what can change live does: the TLS certificate and key files are loaded
//!   again (by `http::tls`, on the same signal). The settings are read again (file,
//!   environment, the same flags) and checked: a file that no longer loads is logged and
//!   nothing changes; otherwise each changed setting is logged as applying at the next
//!   start (listeners, stores and limits are built once). systemd is told `RELOADING=1`
//!   and then `READY=1`. SIGHUP never stops the process.
//! * **Readiness**: `READY=1` (with a `STATUS=` line) once the listener accepts.
//! * **Watchdog**: when systemd sets `WATCHDOG_USEC`, `WATCHDOG=1` is sent every half of it
//!   from a task on the runtime, so a wedged runtime stops feeding it and is restarted.
//!
//! Without `NOTIFY_SOCKET` (not under systemd) the notifications do nothing. Knows nothing
//! of what the server serves.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Reads the settings again, as at start.
pub type Reload = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "could not notify the service manager");
    }
}

/// Tells the service manager the server is ready (listening).
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Feeds systemd's watchdog while the runtime runs, if it asked for one.
pub fn spawn_watchdog() {
    // As sd_watchdog_enabled(3): WATCHDOG_USEC, for this process unless WATCHDOG_PID names
    // another (systemd sets both; the crate's own check wants both).
    let usec: u64 = match std::env::var("WATCHDOG_USEC").ok().and_then(|s| s.parse().ok()) {
        Some(u) if u > 0 => u,
        _ => return,
    };
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return;
    }
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
    tracing::info!(
        every_ms = every.as_millis() as u64,
        "feeding the systemd watchdog"
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    });
}

/// Handles SIGINT and SIGTERM (cancelling `shutdown`) and SIGHUP (reloading with
/// `reload`, compared against `current`).
pub fn spawn_signals(shutdown: CancellationToken, mut current: Config, reload: Option<Reload>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("SIGINT: shutting down");
                    break;
                }
                _ = term.recv() => {
                    tracing::info!("SIGTERM: shutting down");
                    break;
                }
                _ = hangup.recv() => {
                    let mut states = vec![NotifyState::Reloading];
                    if let Ok(now) = NotifyState::monotonic_usec_now() {
                        states.push(now);
                    }
                    notify(&states);
                    match &reload {
                        Some(reload) => match reload() {
                            Ok(new) => {
                                log_changes(&current, &new);
                                current = new;
                            }
                            Err(e) => tracing::error!(error = %e, "SIGHUP: the settings do not load; nothing changed"),
                        },
                        None => tracing::info!("SIGHUP: no settings to read again"),
                    }
                    notify(&[NotifyState::Ready, NotifyState::Status("reloaded")]);
                }
            }
        }
        notify(&[NotifyState::Stopping]);
        shutdown.cancel();
    });
}

/// Logs each setting that differs between `old` and `new`, and when it applies.
fn log_changes(old: &Config, new: &Config) {
    let changed = changed_settings(old, new);
    if changed.is_empty() {
        tracing::info!("SIGHUP: settings read again; none changed");
    }
    for name in changed {
        tracing::warn!(setting = %name, "SIGHUP: changed; applies at the next start");
    }
}

/// Dotted names of the settings (two levels deep) that differ.
pub fn changed_settings(old: &Config, new: &Config) -> Vec<String> {
    let (Ok(a), Ok(b)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let empty = serde_json::Map::new();
    let (a, b) = (a.as_object().unwrap_or(&empty), b.as_object().unwrap_or(&empty));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (Some(serde_json::Value::Object(x)), Some(serde_json::Value::Object(y))) => {
                let mut inner: Vec<&String> = x.keys().chain(y.keys()).collect();
                inner.sort();
                inner.dedup();
                for i in inner {
                    if x.get(i) != y.get(i) {
                        out.push(format!("{k}.{i}"));
                    }
                }
            }
            (x, y) if x != y => out.push(k.clone()),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_changed() {
        let old = Config::default();
        let mut new = old.clone();
        assert!(changed_settings(&old, &new).is_empty());
        new.limits.max_body_bytes += 1;
        new.listen = "127.0.0.1:1".into();
        assert_eq!(
            changed_settings(&old, &new),
            vec!["limits.max_body_bytes", "listen"]
        );
    }
}
