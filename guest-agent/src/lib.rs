//! The hostnet agent: runs in the Linux VM, reports its listening sockets and connects relayed streams to them. (being written)
