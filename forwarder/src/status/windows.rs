//! The control endpoint on Windows: a named pipe (tokio's `named_pipe`), local clients only.
//! Default name: `\\.\pipe\hostnet-forwarder-USERNAME`. The pipe keeps Windows' default access
//! (its creator, SYSTEM and administrators have full control; other local users may read), which
//! is what the status is: read-only.
//!
//! Each client gets one instance: the document is written, then the server waits (bounded) for
//! the client to close, since closing a pipe instance first would throw unread bytes away.

use std::path::{Path, PathBuf};

use tokio::io::AsyncReadExt;
use tokio::net::windows::named_pipe::{ClientOptions, NamedPipeServer, ServerOptions};
use tokio_util::sync::CancellationToken;
use windows_sys::Win32::Foundation::{ERROR_ACCESS_DENIED, ERROR_PIPE_BUSY};

use super::{CONTROL_TIMEOUT, ControlError, StatusReport, answer, document, read_report};

/// The default pipe name, per user.
pub fn default_control_path() -> PathBuf {
    let user: String = std::env::var("USERNAME")
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    let name = if user.is_empty() {
        "hostnet-forwarder".to_owned()
    } else {
        format!("hostnet-forwarder-{user}")
    };
    PathBuf::from(format!(r"\\.\pipe\{name}"))
}

/// The listening control pipe.
#[derive(Debug)]
pub struct ControlSocket {
    server: NamedPipeServer,
    path: PathBuf,
}

impl ControlSocket {
    /// Creates the pipe's first instance; [`ControlError::InUse`] if another forwarder has it.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let server = ServerOptions::new()
            .first_pipe_instance(true)
            .reject_remote_clients(true)
            .create(path)
            .map_err(|error| {
                if error.raw_os_error() == Some(ERROR_ACCESS_DENIED as i32) {
                    ControlError::InUse(path.to_owned())
                } else {
                    ControlError::Io {
                        path: path.to_owned(),
                        error,
                    }
                }
            })?;
        Ok(ControlSocket {
            server,
            path: path.to_owned(),
        })
    }

    /// The pipe name.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers each connection with `report()` until `shutdown`.
    pub async fn serve(
        mut self,
        report: impl Fn() -> StatusReport + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) {
        loop {
            let conn = tokio::select! {
                () = shutdown.cancelled() => return,
                r = self.server.connect() => r,
            };
            if let Err(e) = conn {
                tracing::warn!(error = %e, "control pipe connect failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
            // The next instance first, so that a client never finds no pipe at all.
            let next = match ServerOptions::new()
                .reject_remote_clients(true)
                .create(&self.path)
            {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create the next control pipe instance");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut client = std::mem::replace(&mut self.server, next);
            if let Some(doc) = document(&report) {
                tokio::spawn(async move {
                    answer(&mut client, doc).await;
                    let mut rest = [0u8; 64];
                    let _ = tokio::time::timeout(CONTROL_TIMEOUT, client.read(&mut rest)).await;
                });
            }
        }
    }
}

/// Reads the status from a running forwarder's control pipe (waiting while every instance is
/// busy, within the control timeout).
pub async fn query(path: &Path) -> Result<StatusReport, ControlError> {
    let io_err = |error| ControlError::Io {
        path: path.to_owned(),
        error,
    };
    let deadline = tokio::time::Instant::now() + CONTROL_TIMEOUT;
    let client = loop {
        match ClientOptions::new().open(path) {
            Ok(c) => break c,
            Err(e)
                if e.raw_os_error() == Some(ERROR_PIPE_BUSY as i32)
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(e) => return Err(io_err(e)),
        }
    };
    read_report(client, path).await
}
