//! The sandbox needs Linux network namespaces: elsewhere it explains itself.

use super::SandboxOptions;

pub(super) async fn run(_opts: SandboxOptions) -> anyhow::Result<i32> {
    anyhow::bail!(
        "sandbox needs Linux network namespaces, which this host does not have; run \
         hostnet-agent in your Linux VM and `hostnet-forwarder run --guest URI` here (see the \
         README: \"Use it on your Mac\" / \"Use it on Windows\")"
    )
}
