//! The operating system's requests to stop: SIGINT and SIGTERM on unix; Ctrl-C, Ctrl-Break,
//! closing the console, logoff and system shutdown on Windows. Registered up front (so a failure
//! is a startup error), awaited later.

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

#[cfg(unix)]
mod imp {
    use std::io;

    use tokio::signal::unix::{Signal, SignalKind, signal};

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
