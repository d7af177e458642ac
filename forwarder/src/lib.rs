//! The hostnet forwarder: mirrors the VM's listening ports onto the host's loopback and the host's into the VM. (being written)
