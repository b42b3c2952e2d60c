//! systemd `Type=notify` support: READY=1 once the lease is held, the datapath is programmed
//! and subnet.env is written (never before: units ordered after us read that file).

use sd_notify::NotifyState;
use tracing::{debug, info, warn};

/// Tells the service manager we are ready. A no-op without `$NOTIFY_SOCKET`.
pub fn ready() {
    send(&[NotifyState::Ready], "READY=1");
}

/// Tells the service manager we are stopping (so it does not count a restart as a crash).
pub fn stopping() {
    send(&[NotifyState::Stopping], "STOPPING=1");
}

fn send(state: &[NotifyState], what: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        debug!("no NOTIFY_SOCKET: not running under systemd Type=notify; skipping {what}");
        return;
    }
    match sd_notify::notify(state) {
        Ok(()) => info!("sent {what} to systemd"),
        Err(err) => warn!(error = %err, "sending {what} to $NOTIFY_SOCKET failed"),
    }
}
