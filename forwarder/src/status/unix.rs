//! The control endpoint on unix hosts: a unix socket, mode 0600, in a directory made 0700.
//! Default path: `$XDG_RUNTIME_DIR/hostnet/forwarder.sock`, else `/run/hostnet/forwarder.sock` as
//! root, else `/tmp/hostnet-forwarder-$UID.sock`.

use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::{CONTROL_TIMEOUT, ControlError, StatusReport, answer, document, read_report};

/// The default control socket path.
pub fn default_control_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("hostnet").join("forwarder.sock");
    }
    let uid = nix::unistd::Uid::effective();
    if uid.is_root() {
        PathBuf::from("/run/hostnet/forwarder.sock")
    } else {
        PathBuf::from(format!("/tmp/hostnet-forwarder-{uid}.sock"))
    }
}

/// The listening control socket; removes its file when dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path` (mode 0600), creating its directory (0700) if needed; a stale socket file
    /// (nobody answers) is replaced, a live one is [`ControlError::InUse`].
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let io_err = |error| ControlError::Io {
            path: path.to_owned(),
            error,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            if !dir.exists() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io_err)?;
            }
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io_err)?;
        }
        // Bind with a restrictive umask-free sequence: bind, then chmod before serving.
        let listener = UnixListener::bind(path).map_err(io_err)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(io_err)?;
        }
        Ok(ControlSocket {
            listener,
            path: path.to_owned(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers each connection with `report()` until `shutdown`.
    pub async fn serve(
        self,
        report: impl Fn() -> StatusReport + Send + Sync + 'static,
        shutdown: CancellationToken,
    ) {
        loop {
            let conn = tokio::select! {
                () = shutdown.cancelled() => return,
                r = self.listener.accept() => r,
            };
            match conn {
                Ok((s, _)) => {
                    if let Some(doc) = document(&report) {
                        tokio::spawn(answer(s, doc));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads the status from a running forwarder's control socket.
pub async fn query(path: &Path) -> Result<StatusReport, ControlError> {
    let io_err = |error| ControlError::Io {
        path: path.to_owned(),
        error,
    };
    let s = tokio::time::timeout(CONTROL_TIMEOUT, UnixStream::connect(path))
        .await
        .map_err(|_| io_err(std::io::ErrorKind::TimedOut.into()))?
        .map_err(io_err)?;
    read_report(s, path).await
}
