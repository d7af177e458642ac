//! The readiness pipe on file descriptor 3.
//!
//! dockerd reads the pipe once, two bytes: exactly `0\n` means ready; anything else is followed by
//! an error text read to EOF (`1\n<reason>`). So `0\n` goes out in a single `write(2)`. Run by
//! hand, fd 3 is usually not open, and then nothing is written.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

/// The write end of dockerd's status pipe, if the process was given one.
#[derive(Debug)]
pub struct StatusPipe(Option<File>);

/// The descriptor dockerd puts the status pipe on.
const STATUS_FD: i32 = 3;

impl StatusPipe {
    /// Takes fd 3 if it is open and marks it close-on-exec. Call before anything else opens a
    /// descriptor, or fd 3 may be one of ours rather than dockerd's.
    pub fn take() -> StatusPipe {
        // SAFETY: F_GETFD on a raw number only queries the descriptor table; it is how we learn
        // whether fd 3 exists at all.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(STATUS_FD) };
        if fcntl(borrowed, FcntlArg::F_GETFD).is_err() {
            return StatusPipe(None);
        }
        let _ = fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        // SAFETY: fd 3 is open (F_GETFD succeeded) and nothing else in this process owns it:
        // dockerd hands it to us, and `take` runs before the process opens any descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(STATUS_FD) };
        StatusPipe(Some(File::from(fd)))
    }

    /// A pipe that writes nowhere (for tests and manual runs).
    pub fn none() -> StatusPipe {
        StatusPipe(None)
    }

    /// Reports readiness (`0\n` in one write) and closes the pipe.
    pub fn ready(self) {
        self.send(b"0\n");
    }

    /// Reports a startup failure (`1\n<reason>`) and closes the pipe.
    pub fn fail(self, reason: &str) {
        let mut msg = Vec::with_capacity(reason.len() + 2);
        msg.extend_from_slice(b"1\n");
        msg.extend_from_slice(reason.as_bytes());
        self.send(&msg);
    }

    fn send(self, msg: &[u8]) {
        if let Some(mut f) = self.0 {
            // One write(2): the reader reads two bytes once. A closed reader (EPIPE) or a
            // non-pipe fd 3 is not our failure to report; the process goes on either way.
            if let Err(e) = f.write_all(msg) {
                tracing::warn!(error = %e, "cannot write to the status pipe (fd 3)");
            }
        }
    }
}
