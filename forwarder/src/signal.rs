//! The operating system's requests to stop: SIGINT and SIGTERM on unix; Ctrl-C, Ctrl-Break,
//! closing the console, logoff and system shutdown on Windows. Registered up front (so a failure
//! is a startup error), awaited later.
//!
//! And its requests to reload ([`ReloadSignals`]): SIGHUP on unix, which re-reads the reverse
//! rules file (`--reverse-rules`). Windows has no such signal for a console program; there the
//! rules file is read at start only (restart the forwarder, or the service, to change it).

use std::io;

/// The stop requests of this process.
#[derive(Debug)]
pub struct StopSignals(imp::Signals);

impl StopSignals {
    /// Registers the handlers. Call inside a tokio runtime.
    pub fn new() -> io::Result<Self> {
        imp::Signals::new().map(StopSignals)
    }

    /// Waits for the next stop request; returns its name, for the log.
    pub async fn recv(&mut self) -> &'static str {
        self.0.recv().await
    }
}

/// The reload requests of this process (SIGHUP on unix; none on Windows).
#[derive(Debug)]
pub struct ReloadSignals(imp::Reload);

impl ReloadSignals {
    /// Registers the handler (from then on SIGHUP no longer ends the process). Call inside a
    /// tokio runtime.
    pub fn new() -> io::Result<Self> {
        imp::Reload::new().map(ReloadSignals)
    }

    /// Waits for the next reload request (forever where there are none); returns its name.
    pub async fn recv(&mut self) -> &'static str {
        self.0.recv().await
    }

    /// The reload request of this host system (`SIGHUP`), or `None` where there is none.
    pub const NAME: Option<&'static str> = imp::Reload::NAME;
}

#[cfg(unix)]
mod imp {
    use std::io;

    use tokio::signal::unix::{Signal, SignalKind, signal};

    #[derive(Debug)]
    pub(super) struct Reload(Signal);

    impl Reload {
        pub(super) const NAME: Option<&'static str> = Some("SIGHUP");

        pub(super) fn new() -> io::Result<Self> {
            signal(SignalKind::hangup()).map(Reload)
        }

        pub(super) async fn recv(&mut self) -> &'static str {
            match self.0.recv().await {
                Some(()) => "SIGHUP",
                None => std::future::pending().await,
            }
        }
    }

    #[derive(Debug)]
    pub(super) struct Signals {
        int: Signal,
        term: Signal,
    }

    impl Signals {
        pub(super) fn new() -> io::Result<Self> {
            Ok(Signals {
                int: signal(SignalKind::interrupt())?,
                term: signal(SignalKind::terminate())?,
            })
        }

        pub(super) async fn recv(&mut self) -> &'static str {
            tokio::select! {
                _ = self.int.recv() => "SIGINT",
                _ = self.term.recv() => "SIGTERM",
            }
        }
    }
}

#[cfg(windows)]
mod imp {
    use std::io;

    use tokio::signal::windows::{
        CtrlBreak, CtrlC, CtrlClose, CtrlLogoff, CtrlShutdown, ctrl_break, ctrl_c, ctrl_close,
        ctrl_logoff, ctrl_shutdown,
    };

    /// No reload request exists for a Windows console program or service here.
    #[derive(Debug)]
    pub(super) struct Reload;

    impl Reload {
        pub(super) const NAME: Option<&'static str> = None;

        pub(super) fn new() -> io::Result<Self> {
            Ok(Reload)
        }

        pub(super) async fn recv(&mut self) -> &'static str {
            std::future::pending().await
        }
    }

    #[derive(Debug)]
    pub(super) struct Signals {
        c: CtrlC,
        brk: CtrlBreak,
        close: CtrlClose,
        logoff: CtrlLogoff,
        shutdown: CtrlShutdown,
    }

    impl Signals {
        pub(super) fn new() -> io::Result<Self> {
            Ok(Signals {
                c: ctrl_c()?,
                brk: ctrl_break()?,
                close: ctrl_close()?,
                logoff: ctrl_logoff()?,
                shutdown: ctrl_shutdown()?,
            })
        }

        pub(super) async fn recv(&mut self) -> &'static str {
            tokio::select! {
                _ = self.c.recv() => "Ctrl-C",
                _ = self.brk.recv() => "Ctrl-Break",
                _ = self.close.recv() => "console closed",
                _ = self.logoff.recv() => "logoff",
                _ = self.shutdown.recv() => "system shutdown",
            }
        }
    }
}
