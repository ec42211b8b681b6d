//! systemd's notification protocol (`sd_notify(3)`), without libsystemd: datagrams to the
//! socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
//!
//! - `READY=1` once start-up checks passed and the pipeline runs (copying or streaming — a long
//!   copy must not hit the start timeout), sent once;
//! - `STATUS=…` with the phase and lag, for `systemctl status`;
//! - `WATCHDOG=1` from the loops that do the work, when `$WATCHDOG_USEC` asks for it (and
//!   `$WATCHDOG_PID`, if set, is ours), at most every half of that interval.
//!
//! Without `$NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static READY_SENT: AtomicBool = AtomicBool::new(false);
/// Milliseconds since [`epoch`] of the last watchdog ping.
static LAST_PING_MS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Sends `state` to systemd; false when there is no socket or it failed (never fatal).
pub fn send(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let path = path.to_string_lossy().to_string();
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let Ok(addr) = addr else { return false };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    sock.send_to_addr(state.as_bytes(), &addr).is_ok()
}

/// `READY=1`, once.
pub fn ready() {
    if !READY_SENT.swap(true, Ordering::SeqCst) {
        send("READY=1");
    }
}

/// `STATUS=…` (one line).
pub fn status(text: &str) {
    send(&format!("STATUS={}", text.replace('\n', " ")));
}

/// The watchdog interval systemd asks for, if it asks us.
pub fn watchdog_interval() -> Option<Duration> {
    static INTERVAL: OnceLock<Option<Duration>> = OnceLock::new();
    *INTERVAL.get_or_init(|| {
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
                return None;
            }
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec))
    })
}

/// `WATCHDOG=1` when the watchdog is on and half its interval passed since the last ping.
/// Called from the loops that do the work: a loop that stops calling it gets the service
/// restarted.
pub fn watchdog() {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    let now = epoch().elapsed().as_millis() as u64;
    let last = LAST_PING_MS.load(Ordering::Relaxed);
    if last == 0 || now.saturating_sub(last) >= (interval / 2).as_millis() as u64 {
        LAST_PING_MS.store(now.max(1), Ordering::Relaxed);
        send("WATCHDOG=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_socket_nothing_is_sent() {
        // The test runner is not under systemd's notification socket.
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            assert!(!send("READY=1"));
        }
    }
}
