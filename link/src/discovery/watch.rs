//! The watcher: a thread polling a filtered sock_diag dump, sending what changed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Error;
use super::diag::DiagCounters;
use super::filter::{Discovery, Options};
use super::set::{Diff, ListenerSet, Protocol, diff};

/// Default poll interval: a change is reported within one interval plus one dump (~0.1 ms).
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(50);

/// Capacity of the event channel. A full channel loses nothing: the watcher keeps the last set
/// it delivered and sends the accumulated difference once there is room.
const CHANNEL: usize = 64;

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The full set; always the first event.
    Snapshot(ListenerSet),
    /// What changed since the previous event (never empty).
    Changed(Diff),
}

/// Counters of a running watcher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Polls done (each is one dump per protocol and family).
    pub polls: u64,
    /// Netlink dump requests sent.
    pub dumps: u64,
    /// Polls that failed (netlink I/O or kernel error); the last good set is kept.
    pub errors: u64,
    /// Malformed netlink messages skipped.
    pub malformed: u64,
    /// Dump batches the kernel flagged as interrupted (`NLM_F_DUMP_INTR`).
    pub interrupted: u64,
    /// Events sent.
    pub events: u64,
}

#[derive(Debug, Default)]
struct Shared {
    diag: Arc<DiagCounters>,
    polls: AtomicU64,
    errors: AtomicU64,
    events: AtomicU64,
}

enum Command {
    SetExcluded(BTreeSet<(Protocol, u16)>),
}

/// Starts watchers; see [`Watcher::spawn`].
#[derive(Debug)]
pub struct Watcher;

/// Controls a running watcher. Dropping it stops the watcher thread (and joins it).
#[derive(Debug)]
pub struct WatcherHandle {
    ctl: Option<std_mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Watcher {
    /// Starts a thread that takes a snapshot every `interval` and sends [`Event`]s: a full
    /// [`Event::Snapshot`] first, then an [`Event::Changed`] per poll that saw a change. The
    /// netlink socket is opened here (in the caller's network namespace), so a setup error is
    /// returned at once. The thread needs no tokio runtime; it ends when the handle or the receiver
    /// is dropped.
    pub fn spawn(
        options: Options,
        interval: Duration,
    ) -> Result<(WatcherHandle, mpsc::Receiver<Event>), Error> {
        let shared = Arc::new(Shared::default());
        let discovery = Discovery::with_counters(options, shared.diag.clone())?;
        let (tx, rx) = mpsc::channel(CHANNEL);
        let (ctl_tx, ctl_rx) = std_mpsc::channel();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("hostnet-discovery".into())
            .spawn(move || run(discovery, interval, tx, ctl_rx, &sh))
            .map_err(Error::Spawn)?;
        Ok((
            WatcherHandle {
                ctl: Some(ctl_tx),
                thread: Some(thread),
                shared,
            },
            rx,
        ))
    }
}

impl WatcherHandle {
    /// Replaces the caller-supplied (protocol, port) exclusion set. The watcher polls at once: a
    /// listener newly excluded is reported removed, one no longer excluded is reported added.
    pub fn set_excluded_ports(&self, ports: BTreeSet<(Protocol, u16)>) {
        if let Some(ctl) = &self.ctl {
            // The thread only goes away when the receiver is dropped; then nobody cares.
            let _ = ctl.send(Command::SetExcluded(ports));
        }
    }

    /// The watcher's counters so far.
    pub fn stats(&self) -> Stats {
        let d = &self.shared.diag;
        Stats {
            polls: self.shared.polls.load(Ordering::Relaxed),
            dumps: d.dumps.load(Ordering::Relaxed),
            errors: self.shared.errors.load(Ordering::Relaxed),
            malformed: d.malformed.load(Ordering::Relaxed),
            interrupted: d.interrupted.load(Ordering::Relaxed),
            events: self.shared.events.load(Ordering::Relaxed),
        }
    }

    /// Stops the watcher and waits for its thread to end.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Dropping the command sender wakes the thread's wait at once.
        self.ctl.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WatcherHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(
    mut discovery: Discovery,
    interval: Duration,
    tx: mpsc::Sender<Event>,
    ctl: std_mpsc::Receiver<Command>,
    shared: &Shared,
) {
    // The set the receiver knows; None until the first snapshot is delivered.
    let mut delivered: Option<ListenerSet> = None;
    let mut errors_in_row = 0u32;
    loop {
        if tx.is_closed() {
            break;
        }
        shared.polls.fetch_add(1, Ordering::Relaxed);
        let malformed_before = discovery.malformed();
        match discovery.snapshot() {
            Ok(now) => {
                errors_in_row = 0;
                let event = match &delivered {
                    None => Some(Event::Snapshot(now.clone())),
                    Some(old) => {
                        let d = diff(old, &now);
                        (!d.is_empty()).then_some(Event::Changed(d))
                    }
                };
                if let Some(event) = event {
                    match tx.try_send(event) {
                        Ok(()) => {
                            shared.events.fetch_add(1, Ordering::Relaxed);
                            delivered = Some(now);
                        }
                        // Not delivered: the next poll diffs against the last delivered set.
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            tracing::debug!("discovery: event channel full, change deferred");
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => break,
                    }
                }
            }
            Err(e) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                errors_in_row += 1;
                // Log the first failure of a run, then every 100th, not 20 a second.
                if errors_in_row == 1 || errors_in_row % 100 == 0 {
                    tracing::warn!(error = %e, in_a_row = errors_in_row, "discovery poll failed; keeping the last set");
                }
            }
        }
        let skipped = discovery.malformed() - malformed_before;
        if skipped > 0 {
            tracing::warn!(skipped, "discovery: malformed sock_diag messages skipped");
        }
        match ctl.recv_timeout(interval) {
            Ok(Command::SetExcluded(ports)) => discovery.set_excluded_ports(ports),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    tracing::debug!("discovery watcher stopped");
}
