//! A [`HostListeners`] source that scans on a thread: the macOS and Windows enumerators.

use std::collections::BTreeSet;
use std::io;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hostnet_link::discovery::{PortRange, Protocol};
use hostnet_link::proto::Listener;
use tokio::sync::watch;

use super::{Exclusions, SCAN_INTERVAL, Scanned, StartError, visible};
use crate::reverse::HostListeners;

/// One scan of the host's sockets.
pub type ScanFn = fn() -> io::Result<Vec<Scanned>>;

/// The `start` of the hosts that scan (macOS, Windows): `scan` every [`SCAN_INTERVAL`], UDP
/// ports in `ephemeral` (first, last) left out.
#[cfg_attr(target_os = "linux", allow(dead_code))]
pub(super) fn start_scanning(
    scan: ScanFn,
    ephemeral: Option<(u16, u16)>,
) -> Result<Arc<dyn HostListeners>, StartError> {
    let range = ephemeral.map(|(first, last)| PortRange { first, last });
    Ok(PollingHostListeners::start(scan, SCAN_INTERVAL, range)?)
}

#[derive(Debug)]
struct Shared {
    tx: watch::Sender<BTreeSet<Listener>>,
    exclusions: Mutex<Exclusions>,
}

/// Scans every `interval` on its own thread and publishes the visible set when it changes.
/// [`HostListeners::set_excluded_ports`] rescans at once. The thread ends when this is dropped.
#[derive(Debug)]
pub struct PollingHostListeners {
    shared: Arc<Shared>,
    wake: Mutex<std_mpsc::Sender<()>>,
}

impl PollingHostListeners {
    /// Scans once (a failing first scan is the error: the OS refuses the call) and starts the
    /// thread.
    pub fn start(
        scan: ScanFn,
        interval: Duration,
        ephemeral: Option<PortRange>,
    ) -> io::Result<Arc<Self>> {
        let exclusions = Exclusions {
            own_pid: std::process::id(),
            ports: BTreeSet::new(),
            ephemeral,
        };
        let first = scan()?;
        let (tx, _) = watch::channel(visible(&first, &exclusions));
        let shared = Arc::new(Shared {
            tx,
            exclusions: Mutex::new(exclusions),
        });
        let (wake, rx) = std_mpsc::channel();
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("hostnet-host-scan".into())
            .spawn(move || run(scan, interval, &sh, &rx))?;
        Ok(Arc::new(PollingHostListeners {
            shared,
            wake: Mutex::new(wake),
        }))
    }
}

fn run(scan: ScanFn, interval: Duration, shared: &Shared, wake: &std_mpsc::Receiver<()>) {
    let mut failing = false;
    loop {
        match wake.recv_timeout(interval) {
            Ok(()) | Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        }
        match scan() {
            Ok(found) => {
                if failing {
                    tracing::info!("host listener scan works again");
                    failing = false;
                }
                let set = {
                    let ex = shared.exclusions.lock().unwrap_or_else(|e| e.into_inner());
                    visible(&found, &ex)
                };
                shared.tx.send_if_modified(|cur| {
                    let changed = *cur != set;
                    *cur = set;
                    changed
                });
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "host listener scan failed; keeping the last set");
            }
            Err(e) => tracing::debug!(error = %e, "host listener scan failed again"),
        }
    }
}

impl HostListeners for PollingHostListeners {
    fn subscribe(&self) -> watch::Receiver<BTreeSet<Listener>> {
        self.shared.tx.subscribe()
    }

    fn set_excluded_ports(&self, ports: BTreeSet<(Protocol, u16)>) {
        self.shared
            .exclusions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ports = ports;
        let _ = self.wake.lock().unwrap_or_else(|e| e.into_inner()).send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::atomic::{AtomicU16, Ordering};

    static PORT: AtomicU16 = AtomicU16::new(5000);

    fn fake_scan() -> io::Result<Vec<Scanned>> {
        Ok(vec![Scanned {
            proto: Protocol::Tcp,
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: PORT.load(Ordering::SeqCst),
            v6only: None,
            pid: None,
        }])
    }

    #[tokio::test]
    async fn publishes_changes_and_exclusions() {
        let src = PollingHostListeners::start(fake_scan, Duration::from_millis(10), None).unwrap();
        let mut rx = src.subscribe();
        let ports = |rx: &watch::Receiver<BTreeSet<Listener>>| -> Vec<u16> {
            rx.borrow().iter().map(|l| l.port).collect()
        };
        assert_eq!(ports(&rx), [5000]);
        PORT.store(5001, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ports(&rx), [5001]);
        src.set_excluded_ports([(Protocol::Tcp, 5001)].into());
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(ports(&rx).is_empty());
    }
}
