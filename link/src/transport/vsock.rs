//! `vsock://`: AF_VSOCK through tokio-vsock. Kept thin: everything else (streams, listener
//! loop, errors) is shared with the other transports. Not exercised by the tests on this
//! machine (no vsock loopback); the real-VM test covers it.

use std::io;

use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener, VsockStream};

use super::endpoint::VsockCid;

/// Whether a connection from `peer_cid` may be accepted, given the allowed CIDs
/// (by default only the host, CID 2).
pub fn cid_allowed(peer_cid: u32, allowed: &[u32]) -> bool {
    allowed.contains(&peer_cid)
}

pub(crate) async fn connect(cid: u32, port: u32) -> io::Result<VsockStream> {
    VsockStream::connect(VsockAddr::new(cid, port)).await
}

pub(crate) fn bind(cid: VsockCid, port: u32) -> io::Result<VsockListener> {
    let cid = match cid {
        VsockCid::Any => VMADDR_CID_ANY,
        VsockCid::Id(cid) => cid,
    };
    VsockListener::bind(VsockAddr::new(cid, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_cids_pass() {
        assert!(cid_allowed(2, &[2]));
        assert!(!cid_allowed(3, &[2]));
        assert!(!cid_allowed(1, &[2]));
        assert!(cid_allowed(3, &[2, 3]));
        assert!(!cid_allowed(2, &[]));
    }
}
