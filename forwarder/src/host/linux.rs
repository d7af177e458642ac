//! Linux: the host's listeners from a `hostnet_link::discovery::Watcher` (netlink sock_diag).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use hostnet_link::discovery::{self, Protocol};
use hostnet_link::proto::Listener;
use tokio::sync::watch;

use super::StartError;
use crate::reverse::{HostListeners, to_proto};

pub(super) fn start() -> Result<Arc<dyn HostListeners>, StartError> {
    Ok(LinuxHostListeners::start(Default::default())?)
}

/// The Linux host's listeners, from a `hostnet_link::discovery::Watcher` (kernel listen/bind
/// events as root, else a poll every second with removals announced at once; see
/// `hostnet_link::discovery`; `HOSTNET_DISCOVERY=poll` forces polling). Leaves out this
/// process's own sockets and UDP sockets on ephemeral ports.
#[derive(Debug)]
pub struct LinuxHostListeners {
    handle: Mutex<discovery::WatcherHandle>,
    tx: watch::Sender<BTreeSet<Listener>>,
}

impl LinuxHostListeners {
    /// Starts the watcher (in the caller's network namespace) and a task that follows it. Call
    /// inside a tokio runtime.
    pub fn start(options: discovery::Options) -> Result<Arc<Self>, discovery::Error> {
        let (handle, mut rx) = discovery::Watcher::spawn(options, discovery::DEFAULT_INTERVAL)?;
        let (tx, _) = watch::channel(BTreeSet::new());
        let this = Arc::new(LinuxHostListeners {
            handle: Mutex::new(handle),
            tx,
        });
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            let mut set = discovery::ListenerSet::new();
            while let Some(ev) = rx.recv().await {
                match ev {
                    discovery::Event::Snapshot(s) => set = s,
                    discovery::Event::Changed(d) => set.apply(&d),
                }
                let Some(this) = weak.upgrade() else { return };
                this.tx
                    .send_replace(set.iter().filter_map(to_proto).collect());
            }
        });
        Ok(this)
    }
}

impl HostListeners for LinuxHostListeners {
    fn subscribe(&self) -> watch::Receiver<BTreeSet<Listener>> {
        self.tx.subscribe()
    }

    fn set_excluded_ports(&self, ports: BTreeSet<(Protocol, u16)>) {
        self.handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_excluded_ports(ports);
    }
}
