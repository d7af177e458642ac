//! `unix://` listening sockets: mode 0600 from the start, stale files replaced, live ones kept.
//!
//! **Why `fchmod` before `bind`.** The socket file must never exist with a wider mode, even
//! briefly. Setting the umask around `bind` is process-wide and races with every other thread
//! creating files (tokio's blocking pool, the tracing writer...), so it is not safe in a
//! multi-threaded process. Binding in a private 0700 directory and renaming works but needs a
//! second path that still fits the 108-byte `sun_path` limit. Linux offers a simpler way:
//! `unix_bind` creates the file with the socket inode's mode (masked by the umask), and that
//! mode can be set with `fchmod(fd, 0600)` before `bind`. So the file is born 0600 (or
//! narrower). A `chmod` after `bind` follows for kernels that ignore the inode mode; it is a
//! no-op on Linux.
//!
//! **Stale files.** An existing socket file that refuses connections (nobody listens: the
//! previous agent died) is removed and bound again. One that accepts connections (or whose
//! backlog is full) belongs to a live listener: [`TransportError::AddrInUse`]. A path that is not
//! a socket is never removed. The probe is a real connection: a live listener sees it as a
//! client that closes at once without a byte (an empty stream, like any stray client). The check and the re-bind are not atomic: two listeners started at
//! the same instant on the same path may both think the file is stale; the loser's `bind` then
//! fails with `EADDRINUSE`, which is reported.
//!
//! When the listener is dropped its socket file is removed, if it is still the same file.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use super::SOCKET_MODE;
use super::endpoint::Endpoint;
use super::error::TransportError;
use super::unix_io::UnixIo;

/// Removes the socket file on drop if it is still ours (same device and inode).
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

/// What is at a socket path.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PathState {
    Free,
    Stale,
    Live,
    NotASocket,
}

/// Probes `path` without blocking: a non-blocking connect to a live listener succeeds (or
/// returns `EAGAIN` when its backlog is full); a stale file refuses.
pub(crate) fn probe(path: &Path) -> io::Result<PathState> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(PathState::Free),
        Err(e) => return Err(e),
        Ok(meta) if !meta.file_type().is_socket() => return Ok(PathState::NotASocket),
        Ok(_) => {}
    }
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    probe.set_nonblocking(true)?;
    match probe.connect(&SockAddr::unix(path)?) {
        Ok(()) => Ok(PathState::Live),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(PathState::Stale),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(PathState::Free),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(PathState::Live),
        Err(e) => Err(e),
    }
}

/// Connects to the unix socket at `path`.
///
/// A unix `connect` completes within the call when the listener's backlog has room (and
/// fails with `EAGAIN` when it has none, as tokio's connect does): so the socket is connected
/// directly, without the turn of the event loop that tokio's connect spends waiting for a
/// writable event (one per relayed connection). Where a system answers `EINPROGRESS`, tokio's
/// connect does it.
pub(crate) async fn connect(path: &Path) -> io::Result<UnixIo> {
    // Born non-blocking where the system allows (two fcntl calls fewer per connection).
    #[cfg(target_os = "linux")]
    let s = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None)?;
    #[cfg(not(target_os = "linux"))]
    let s = {
        let s = Socket::new(Domain::UNIX, Type::STREAM, None)?;
        s.set_nonblocking(true)?;
        s
    };
    match s.connect(&SockAddr::unix(path)?) {
        Ok(()) => UnixIo::from_std(s.into()),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            drop(s);
            UnixIo::from_tokio(tokio::net::UnixStream::connect(path).await?)
        }
        Err(e) => Err(e),
    }
}

/// Accepts one connection: the stream and the peer's pid and uid where the OS tells
/// (`SO_PEERCRED`, `LOCAL_PEERCRED`).
pub(crate) async fn accept(
    listener: &tokio::net::UnixListener,
) -> io::Result<(UnixIo, Option<i32>, Option<u32>)> {
    let (s, _) = listener.accept().await?;
    let cred = s.peer_cred().ok();
    Ok((
        UnixIo::from_tokio(s)?,
        cred.and_then(|c| c.pid()),
        cred.map(|c| c.uid()),
    ))
}

/// Binds and listens on `path` with mode 0600 (see the module docs).
pub(crate) fn bind(
    endpoint: &Endpoint,
    path: &Path,
) -> Result<(tokio::net::UnixListener, SocketFile), TransportError> {
    let bind_err = |source| TransportError::Bind {
        endpoint: endpoint.clone(),
        source,
    };
    match probe(path).map_err(bind_err)? {
        PathState::Free => {}
        PathState::Live => {
            return Err(TransportError::AddrInUse {
                endpoint: endpoint.clone(),
                reason: "another process is listening on this socket",
            });
        }
        PathState::NotASocket => {
            return Err(TransportError::AddrInUse {
                endpoint: endpoint.clone(),
                reason: "the path exists and is not a socket; not removing it",
            });
        }
        PathState::Stale => {
            tracing::info!(path = %path.display(), "removing stale socket file (nobody listening)");
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(bind_err(e)),
            }
        }
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(bind_err)?;
    // SOCKET_MODE, 0600 (`mode_t` is u32 on Linux, u16 on macOS).
    nix::sys::stat::fchmod(
        &socket,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .map_err(|e| bind_err(e.into()))?;
    socket
        .bind(&SockAddr::unix(path).map_err(bind_err)?)
        .map_err(bind_err)?;
    let meta = fs::symlink_metadata(path).map_err(bind_err)?;
    // From here on the file is ours: remove it if anything below fails.
    let file = SocketFile {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    if meta.permissions().mode() & 0o777 & !SOCKET_MODE != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE)).map_err(bind_err)?;
    }
    socket.listen(1024).map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    let std_listener: std::os::unix::net::UnixListener = socket.into();
    let listener = tokio::net::UnixListener::from_std(std_listener).map_err(bind_err)?;
    Ok((listener, file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_tells_states_apart() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        assert_eq!(probe(&p).unwrap(), PathState::Free);
        let l = std::os::unix::net::UnixListener::bind(&p).unwrap();
        assert_eq!(probe(&p).unwrap(), PathState::Live);
        drop(l);
        assert_eq!(probe(&p).unwrap(), PathState::Stale);
        let f = dir.path().join("f");
        fs::write(&f, b"x").unwrap();
        assert_eq!(probe(&f).unwrap(), PathState::NotASocket);
    }
}
