//! Linux and macOS: the service files are installed by hand (see the parent module).

use super::ServiceAction;

pub(super) fn dispatch(_action: ServiceAction) -> anyhow::Result<i32> {
    anyhow::bail!(
        "the service subcommand is for Windows; on Linux install the systemd user unit \
         (forwarder/service/hostnet-forwarder.service), on macOS the launchd agent \
         (forwarder/service/io.hostnet.forwarder.plist): see the README"
    )
}
