//! The watcher: a thread that takes a filtered sock_diag dump when the kernel says a listener may
//! have come or gone (and every so often regardless), and sends what changed.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Error;
use super::diag::DiagCounters;
use super::events::{DestroyGroups, Tracepoints};
use super::filter::{Discovery, Options};
use super::set::{Diff, ListenerSet, Protocol, diff};

/// Poll interval where the kernel gives no listen/bind events ([`Mode::Poll`]): an addition is
/// seen within a second, a removal at once (sock_diag destroy announcements need no privilege).
/// One dump a second keeps an idle process at about one wake-up a second.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// Dump interval in [`Mode::Events`]: a safety net for changes no event announces (a UDP socket
/// un-connected with `AF_UNSPEC`, a bind through io_uring or a 32-bit syscall, a CPU brought
/// online after the watcher started).
pub const SAFETY_INTERVAL: Duration = Duration::from_secs(2);

/// Least time between two event-driven dumps, and the delay of the re-check dump after each:
/// a burst of events costs one dump, then one per gap. The re-check exists because
/// `inet_sock_set_state` fires inside listen(2) just before the socket enters the listening hash.
pub const DEBOUNCE: Duration = Duration::from_millis(2);

/// The gap doubles with every event-driven dump that follows another (a machine busy binding
/// and listening: the tracepoints are system-wide, so other namespaces count too) up to this,
/// and is [`DEBOUNCE`] again after the first quiet re-check. A storm of events then costs at
/// most ~125 dumps and wake-ups a second (~70 µs each: about 1% of a core) and delays a change
/// by at most this much, which keeps the 10 ms latency target even on a busy machine (measured
/// with ~300 foreign binds a second: 64 ms here gave a p99 of 64 ms).
pub const MAX_DEBOUNCE: Duration = Duration::from_millis(8);

/// Environment variable read by [`WatchConfig::from_env`]: `poll` forces [`Mode::Poll`], `auto`
/// (or unset) uses kernel events where they are available.
pub const MODE_ENV: &str = "HOSTNET_DISCOVERY";

/// Capacity of the event channel. A full channel loses nothing: the watcher keeps the last set
/// it delivered and sends the accumulated difference once there is room.
const CHANNEL: usize = 64;

/// What triggers a dump.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// A dump every [`WatchConfig::poll_interval`], and at once when a listener's socket is
    /// destroyed (sock_diag destroy announcements, no privilege needed).
    #[default]
    Poll,
    /// A dump at once when the kernel reports a TCP socket entering or leaving `LISTEN`, a
    /// bind(2) of an inet address, or a UDP listener destroyed; and every
    /// [`WatchConfig::safety_interval`]. Needs root (or `CAP_PERFMON` and a readable tracefs).
    Events,
}

impl Mode {
    /// `"poll"` or `"events"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Poll => "poll",
            Mode::Events => "events",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a watcher decides when to dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchConfig {
    /// Poll even where kernel events are available ([`MODE_ENV`]`=poll`).
    pub force_poll: bool,
    /// Dump interval in [`Mode::Poll`].
    pub poll_interval: Duration,
    /// Dump interval in [`Mode::Events`].
    pub safety_interval: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self::new(DEFAULT_INTERVAL)
    }
}

impl WatchConfig {
    /// Events where available, else polling every `poll_interval`.
    pub fn new(poll_interval: Duration) -> Self {
        Self {
            force_poll: false,
            poll_interval,
            safety_interval: SAFETY_INTERVAL,
        }
    }

    /// This config with [`MODE_ENV`] applied (an unknown value is logged and ignored).
    pub fn from_env(mut self) -> Self {
        match std::env::var(MODE_ENV).as_deref() {
            Ok("poll") => self.force_poll = true,
            Ok("auto" | "") | Err(_) => {}
            Ok(other) => {
                tracing::warn!(
                    value = other,
                    "{MODE_ENV}: expected poll or auto; using auto"
                );
            }
        }
        self
    }
}

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
    /// What triggers the dumps.
    pub mode: Mode,
    /// Snapshots taken (each is one dump per protocol and family).
    pub polls: u64,
    /// Netlink dump requests sent.
    pub dumps: u64,
    /// Kernel events that asked for a snapshot (several may share one).
    pub kernel_events: u64,
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
    mode: AtomicU8,
    polls: AtomicU64,
    kernel_events: AtomicU64,
    errors: AtomicU64,
    events: AtomicU64,
}

impl Shared {
    fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Relaxed);
    }

    fn mode(&self) -> Mode {
        if self.mode.load(Ordering::Relaxed) == Mode::Events as u8 {
            Mode::Events
        } else {
            Mode::Poll
        }
    }
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
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Watcher {
    /// [`Watcher::spawn_with`] with `poll_interval` as the polling fallback's interval and
    /// [`MODE_ENV`] applied ([`WatchConfig::from_env`]).
    pub fn spawn(
        options: Options,
        poll_interval: Duration,
    ) -> Result<(WatcherHandle, mpsc::Receiver<Event>), Error> {
        Self::spawn_with(options, WatchConfig::new(poll_interval).from_env())
    }

    /// Starts a thread that sends [`Event`]s: a full [`Event::Snapshot`] first, then an
    /// [`Event::Changed`] per dump that saw a change. The kernel event sources and the netlink
    /// socket are opened here (in the caller's network namespace), the [`Mode`] is decided here
    /// (logged at info) and a setup error is returned at once. The thread needs no tokio
    /// runtime; it ends when the handle is dropped, or at its next dump once the receiver is.
    pub fn spawn_with(
        options: Options,
        config: WatchConfig,
    ) -> Result<(WatcherHandle, mpsc::Receiver<Event>), Error> {
        let shared = Arc::new(Shared::default());
        let discovery = Discovery::with_counters(options, shared.diag.clone())?;
        let sources = Sources::open(&config);
        shared.set_mode(sources.mode());
        let waker = Arc::new(Waker::new().map_err(Error::Spawn)?);
        let (tx, rx) = mpsc::channel(CHANNEL);
        let (ctl_tx, ctl_rx) = std_mpsc::channel();
        let sh = shared.clone();
        let wk = waker.clone();
        let thread = std::thread::Builder::new()
            .name("hostnet-discovery".into())
            .spawn(move || run(discovery, sources, &config, &tx, &ctl_rx, &wk, &sh))
            .map_err(Error::Spawn)?;
        Ok((
            WatcherHandle {
                ctl: Some(ctl_tx),
                waker,
                thread: Some(thread),
                shared,
            },
            rx,
        ))
    }
}

impl WatcherHandle {
    /// Replaces the caller-supplied (protocol, port) exclusion set. The watcher dumps at once: a
    /// listener newly excluded is reported removed, one no longer excluded is reported added.
    pub fn set_excluded_ports(&self, ports: BTreeSet<(Protocol, u16)>) {
        if let Some(ctl) = &self.ctl {
            // The thread only goes away when the receiver is dropped; then nobody cares.
            let _ = ctl.send(Command::SetExcluded(ports));
            self.waker.wake();
        }
    }

    /// What triggers this watcher's dumps.
    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// The watcher's counters so far.
    pub fn stats(&self) -> Stats {
        let d = &self.shared.diag;
        Stats {
            mode: self.shared.mode(),
            polls: self.shared.polls.load(Ordering::Relaxed),
            dumps: d.dumps.load(Ordering::Relaxed),
            kernel_events: self.shared.kernel_events.load(Ordering::Relaxed),
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
        // Dropping the command sender, then waking the thread, ends it at once.
        if self.ctl.take().is_some() {
            self.waker.wake();
        }
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

/// An eventfd that interrupts the thread's wait (commands, shutdown).
#[derive(Debug)]
struct Waker(OwnedFd);

impl Waker {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer. Only a counter overflow (2^64 wakes) fails.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    fn clear(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer; EAGAIN (not woken) is fine.
        unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

/// The kernel event sources a watcher listens to.
#[derive(Debug)]
struct Sources {
    tracepoints: Option<Tracepoints>,
    destroy: Option<DestroyGroups>,
}

impl Sources {
    /// Tracepoints where possible ([`Mode::Events`], with UDP destroy announcements, since UDP
    /// has no close tracepoint), else TCP and UDP destroy announcements ([`Mode::Poll`]).
    /// TCP announcements are left out in event mode: subscribing makes the kernel build one for
    /// every TCP socket freed in the namespace, and the tracepoint already sees `LISTEN` end.
    fn open(config: &WatchConfig) -> Self {
        let tracepoints = if config.force_poll {
            tracing::info!(mode = "poll", interval = ?config.poll_interval, "discovery: polling ({MODE_ENV}=poll)");
            None
        } else {
            match Tracepoints::open() {
                Ok(t) => {
                    tracing::info!(
                        mode = "events",
                        safety_interval = ?config.safety_interval,
                        udp_bind_events = t.bind,
                        "discovery: kernel events (perf tracepoints sock:inet_sock_set_state, syscalls:sys_enter_bind)"
                    );
                    Some(t)
                }
                Err(why) => {
                    tracing::info!(mode = "poll", interval = ?config.poll_interval, reason = %why, "discovery: no kernel listen events; polling");
                    None
                }
            }
        };
        let protocols: &[Protocol] = if tracepoints.is_some() {
            &[Protocol::Udp]
        } else {
            &[Protocol::Tcp, Protocol::Udp]
        };
        let destroy = match DestroyGroups::open(protocols) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::info!(error = %e, "discovery: no sock_diag destroy announcements; removals wait for the next dump");
                None
            }
        };
        Self {
            tracepoints,
            destroy,
        }
    }

    fn mode(&self) -> Mode {
        if self.tracepoints.is_some() {
            Mode::Events
        } else {
            Mode::Poll
        }
    }
}

/// When to dump next: plain logic on instants, tested without a kernel.
///
/// A kernel event makes a dump due at once, unless one started less than the gap ago (then it
/// is due a gap after that one). A dump that events made due is followed by a re-check dump a
/// gap later. The gap is `base`, doubled for every event-driven dump in a row up to `max`.
/// Without events, a dump is due `every` after the previous one.
#[derive(Debug)]
struct Schedule {
    every: Duration,
    base: Duration,
    max: Duration,
    /// Start of the last dump; `None` before the first.
    last: Option<Instant>,
    /// Event-driven dumps in a row (the last one included).
    streak: u32,
    /// An event came since the last dump started.
    dirty: bool,
    /// A dump is due now, whatever the gap (a command).
    asap: bool,
}

impl Schedule {
    fn new(every: Duration, base: Duration, max: Duration) -> Self {
        Self {
            every,
            base,
            max,
            last: None,
            streak: 0,
            dirty: false,
            asap: false,
        }
    }

    fn event(&mut self) {
        self.dirty = true;
    }

    fn asap(&mut self) {
        self.asap = true;
    }

    /// Whether a dump is already due within a gap: events need not be watched until it starts.
    fn pending(&self) -> bool {
        self.dirty || self.asap
    }

    fn gap(&self) -> Duration {
        let doublings = self.streak.saturating_sub(1).min(16);
        self.base.saturating_mul(1 << doublings).min(self.max)
    }

    /// When the next dump is due (it may be in the past).
    fn due(&self, now: Instant) -> Instant {
        match self.last {
            None => now,
            Some(_) if self.asap => now,
            Some(last) if self.dirty || self.streak > 0 => last + self.gap(),
            Some(last) => last + self.every,
        }
    }

    /// A dump starts at `now`.
    fn dumped(&mut self, now: Instant) {
        self.streak = if self.dirty { self.streak + 1 } else { 0 };
        self.dirty = false;
        self.asap = false;
        self.last = Some(now);
    }
}

fn run(
    mut discovery: Discovery,
    mut sources: Sources,
    config: &WatchConfig,
    tx: &mpsc::Sender<Event>,
    ctl: &std_mpsc::Receiver<Command>,
    waker: &Waker,
    shared: &Shared,
) {
    let every = |s: &Sources| match s.mode() {
        Mode::Events => config.safety_interval,
        Mode::Poll => config.poll_interval,
    };
    let mut schedule = Schedule::new(every(&sources), DEBOUNCE, MAX_DEBOUNCE);
    // The set the receiver knows; None until the first snapshot is delivered.
    let mut delivered: Option<ListenerSet> = None;
    // (protocol, port) of the last snapshot's listeners: a destroy announcement for one of
    // these is worth a dump, any other is not.
    let mut known: HashSet<(Protocol, u16)> = HashSet::new();
    let mut errors_in_row = 0u32;
    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    loop {
        let now = Instant::now();
        let due = schedule.due(now);
        if due <= now {
            if tx.is_closed() {
                break;
            }
            schedule.dumped(now);
            match poll_once(
                &mut discovery,
                &mut delivered,
                tx,
                shared,
                &mut errors_in_row,
            ) {
                Ok(Some(set)) => known = set.iter().map(|l| (l.proto, l.port)).collect(),
                Ok(None) => {}
                Err(Closed) => break,
            }
            continue;
        }

        // Wait for the waker, an event source, or the due time. While a dump is already due, the
        // event sources are left alone: what they gather meanwhile is read after that dump (and
        // makes one more), so a stream of events wakes the thread once per dump, not per event.
        pollfds.clear();
        let watch_events = !schedule.pending();
        let fds = std::iter::once(waker.0.as_fd())
            .chain(sources.destroy.as_ref().map(DestroyGroups::fd))
            .chain(sources.tracepoints.iter().flat_map(Tracepoints::fds))
            .take(if watch_events { usize::MAX } else { 1 });
        pollfds.extend(fds.map(|fd: BorrowedFd<'_>| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        if let Err(e) = wait(&mut pollfds, due - now) {
            tracing::warn!(error = %e, "discovery: ppoll failed; polling");
            std::thread::sleep(config.poll_interval.min(due - now));
            continue;
        }
        let ready = |i: usize| pollfds.get(i).is_some_and(|p| p.revents != 0);
        if !watch_events {
            if ready(0) {
                waker.clear();
                if !commands(ctl, &mut discovery, &mut schedule) {
                    break;
                }
            }
            continue;
        }
        let mut triggered = 0u64;
        if ready(0) {
            waker.clear();
            if !commands(ctl, &mut discovery, &mut schedule) {
                break;
            }
        }
        let mut next = 1;
        if let Some(d) = sources.destroy.as_mut() {
            if ready(next) {
                d.drain(|announced| match announced {
                    Some(key) if !known.contains(&key) => {}
                    // A listener's socket, or lost announcements.
                    _ => triggered += 1,
                });
            }
            next += 1;
        }
        if let Some(t) = &sources.tracepoints {
            let rings = pollfds.get(next..).unwrap_or_default();
            if rings
                .iter()
                .any(|p| p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0)
            {
                tracing::warn!("discovery: a perf event was shut down; polling from now on");
                sources.tracepoints = None;
                shared.set_mode(Mode::Poll);
                schedule.every = every(&sources);
                triggered += 1;
            } else if rings.iter().any(|p| p.revents != 0) && t.drain() {
                triggered += 1;
            }
        }
        if triggered > 0 {
            shared.kernel_events.fetch_add(triggered, Ordering::Relaxed);
            schedule.event();
        }
    }
    tracing::debug!("discovery watcher stopped");
}

/// Applies the pending commands; false once the handle is gone.
fn commands(
    ctl: &std_mpsc::Receiver<Command>,
    discovery: &mut Discovery,
    schedule: &mut Schedule,
) -> bool {
    loop {
        match ctl.try_recv() {
            Ok(Command::SetExcluded(ports)) => {
                discovery.set_excluded_ports(ports);
                schedule.asap();
            }
            Err(std_mpsc::TryRecvError::Empty) => return true,
            Err(std_mpsc::TryRecvError::Disconnected) => return false,
        }
    }
}

/// The receiver is gone.
struct Closed;

/// One snapshot, diffed against what was delivered and sent if it changed. Returns the snapshot
/// (None if it failed).
fn poll_once(
    discovery: &mut Discovery,
    delivered: &mut Option<ListenerSet>,
    tx: &mpsc::Sender<Event>,
    shared: &Shared,
    errors_in_row: &mut u32,
) -> Result<Option<ListenerSet>, Closed> {
    shared.polls.fetch_add(1, Ordering::Relaxed);
    let malformed_before = discovery.malformed();
    let result = discovery.snapshot();
    let skipped = discovery.malformed() - malformed_before;
    if skipped > 0 {
        tracing::warn!(skipped, "discovery: malformed sock_diag messages skipped");
    }
    match result {
        Ok(now) => {
            *errors_in_row = 0;
            let event = match &*delivered {
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
                        *delivered = Some(now.clone());
                    }
                    // Not delivered: the next dump diffs against the last delivered set.
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::debug!("discovery: event channel full, change deferred");
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return Err(Closed),
                }
            }
            Ok(Some(now))
        }
        Err(e) => {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            *errors_in_row += 1;
            // Log the first failure of a run, then every 100th.
            if *errors_in_row == 1 || *errors_in_row % 100 == 0 {
                tracing::warn!(error = %e, in_a_row = *errors_in_row, "discovery poll failed; keeping the last set");
            }
            Ok(None)
        }
    }
}

/// ppoll(2) on `fds` for at most `timeout`; EINTR counts as a timeout.
fn wait(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<()> {
    // (Without naming `time_t`, deprecated on musl targets; an i32 of seconds is 68 years.)
    let ts = libc::timespec {
        tv_sec: i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX).into(),
        // Below 10^9: fits a `c_long` of either width.
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()` pollfds; `ts` lives for
    // the call; a NULL sigmask leaves the mask alone.
    let r = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn schedule() -> Schedule {
        Schedule::new(1000 * MS, 2 * MS, 64 * MS)
    }

    #[test]
    fn first_dump_at_once_then_every_interval() {
        let t0 = Instant::now();
        let mut s = schedule();
        assert_eq!(s.due(t0), t0);
        s.dumped(t0);
        assert_eq!(s.due(t0), t0 + 1000 * MS);
        s.dumped(t0 + 1000 * MS);
        assert_eq!(s.due(t0), t0 + 2000 * MS);
    }

    #[test]
    fn event_dumps_at_once_then_rechecks_once() {
        let t0 = Instant::now();
        let mut s = schedule();
        s.dumped(t0);
        let t1 = t0 + 500 * MS;
        s.event();
        assert!(s.pending());
        assert!(
            s.due(t1) <= t1,
            "due at once: the last dump is older than the gap"
        );
        s.dumped(t1);
        assert!(!s.pending());
        assert_eq!(s.due(t1), t1 + 2 * MS, "the re-check");
        s.dumped(t1 + 2 * MS);
        assert_eq!(s.due(t1), t1 + 1002 * MS, "back to the interval");
    }

    #[test]
    fn event_inside_the_gap_waits_for_it() {
        let t0 = Instant::now();
        let mut s = schedule();
        s.dumped(t0);
        s.event();
        s.dumped(t0 + 100 * MS);
        s.event();
        assert_eq!(s.due(t0 + 101 * MS), t0 + 102 * MS);
    }

    /// Simulates `events_per_sec` for `secs` and returns the dumps taken.
    fn storm(s: &mut Schedule, start: Instant, events_per_sec: u32, secs: u32) -> u32 {
        let step = Duration::from_secs(1) / events_per_sec;
        let mut t = start;
        let mut dumps = 0;
        while t < start + Duration::from_secs(secs.into()) {
            s.event();
            if s.due(t) <= t {
                s.dumped(t);
                dumps += 1;
            }
            t += step;
        }
        dumps
    }

    #[test]
    fn a_storm_backs_off_to_the_max_gap_and_recovers() {
        let t0 = Instant::now();
        let mut s = Schedule::new(1000 * MS, 2 * MS, 8 * MS);
        s.dumped(t0);
        let dumps = storm(&mut s, t0 + 100 * MS, 10_000, 2);
        // 2, 4, 8 ms gaps, then 8 ms: about 125 a second.
        assert!((240..=260).contains(&dumps), "{dumps} dumps in 2 s");
        assert_eq!(s.gap(), 8 * MS);
        // The storm ends: the pending dump, one quiet re-check, and the gap is back to 2 ms.
        let last = s.last.unwrap();
        let t = s.due(last);
        s.dumped(t);
        s.dumped(s.due(t));
        assert_eq!(s.streak, 0);
        assert_eq!(s.gap(), 2 * MS);
    }

    #[test]
    fn command_dumps_at_once_even_inside_the_gap() {
        let t0 = Instant::now();
        let mut s = schedule();
        s.dumped(t0);
        s.asap();
        assert_eq!(s.due(t0), t0);
        s.dumped(t0);
        assert_eq!(s.due(t0), t0 + 1000 * MS, "no re-check after a command");
    }
}
