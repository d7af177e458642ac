//! Hosts without an enumerator: the reverse direction is off (`--no-reverse`) there.

use std::sync::Arc;

use super::StartError;
use crate::reverse::HostListeners;

pub(super) fn start() -> Result<Arc<dyn HostListeners>, StartError> {
    Err("this host system has no listener enumerator; run with --no-reverse".into())
}
