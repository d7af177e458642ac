//! `hvsock://VMID:PORT`: Hyper-V sockets (AF_HYPERV) from a Windows host to a Hyper-V or WSL2
//! VM. This module is the portable part, tested on every host: the GUIDs and the socket address
//! layout. The socket itself is opened by the Windows `sys` module.
//!
//! A Hyper-V socket address is `SOCKADDR_HV { Family: u16 = AF_HYPERV (34), Reserved: u16,
//! VmId: GUID, ServiceId: GUID }` (36 bytes). A Linux guest sees a connection to the service id
//! `PPPPPPPP-FACB-11E6-BD58-64006A7986D3` as an AF_VSOCK connection to port `0xPPPPPPPP` from
//! the host (CID 2): the agent listens on `vsock://any:PORT` as on any other hypervisor (the
//! mapping of go-winio's `VsockServiceID` and of the Linux `hv_sock` driver). The stream is a
//! vsock stream on the guest's side, so it is framed like vsock (no reset; see
//! [`crate::proto`]).
//!
//! A GUID is written `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (optionally in braces) and stored
//! the Windows way: the first three fields little-endian, the last eight bytes as written.

use std::fmt;
use std::str::FromStr;

/// The address family of Hyper-V sockets (`AF_HYPERV`).
pub const AF_HYPERV: u16 = 34;
/// The protocol of Hyper-V stream sockets (`HV_PROTOCOL_RAW`).
pub const HV_PROTOCOL_RAW: i32 = 1;
/// The size of `SOCKADDR_HV`.
pub const SOCKADDR_HV_LEN: usize = 36;

/// A GUID (a Hyper-V VM id or service id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid {
    /// The first field (8 hex digits).
    pub data1: u32,
    /// The second field (4 hex digits).
    pub data2: u16,
    /// The third field (4 hex digits).
    pub data3: u16,
    /// The last 16 hex digits, as written.
    pub data4: [u8; 8],
}

/// The template of the service ids of Linux vsock ports (`00000000-FACB-11E6-BD58-64006A7986D3`).
pub const VSOCK_TEMPLATE: Guid = Guid {
    data1: 0,
    data2: 0xFACB,
    data3: 0x11E6,
    data4: [0xBD, 0x58, 0x64, 0x00, 0x6A, 0x79, 0x86, 0xD3],
};

impl Guid {
    /// The service id under which a Linux guest's vsock port `port` is reached.
    pub fn vsock_service(port: u32) -> Guid {
        Guid {
            data1: port,
            ..VSOCK_TEMPLATE
        }
    }

    /// The vsock port of a service id made by [`Guid::vsock_service`], else `None`.
    pub fn vsock_port(&self) -> Option<u32> {
        let Guid { data1, .. } = *self;
        (Guid { data1: 0, ..*self } == VSOCK_TEMPLATE).then_some(data1)
    }

    /// The 16 bytes of the Windows `GUID` struct (fields little-endian).
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.data1.to_le_bytes());
        b[4..6].copy_from_slice(&self.data2.to_le_bytes());
        b[6..8].copy_from_slice(&self.data3.to_le_bytes());
        b[8..16].copy_from_slice(&self.data4);
        b
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.data4;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            self.data1, self.data2, self.data3, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
        )
    }
}

/// Why a GUID does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a GUID (expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")]
pub struct BadGuid(pub String);

impl FromStr for Guid {
    type Err = BadGuid;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadGuid(s.to_owned());
        let inner = match s.strip_prefix('{') {
            Some(rest) => rest.strip_suffix('}').ok_or_else(bad)?,
            None => s,
        };
        let groups: Vec<&str> = inner.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        if groups.len() != lens.len()
            || groups
                .iter()
                .zip(lens)
                .any(|(g, n)| g.len() != n || !g.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(bad());
        }
        let hex = |g: &str| u64::from_str_radix(g, 16).map_err(|_| bad());
        let tail = format!("{}{}", groups[3], groups[4]);
        let mut data4 = [0u8; 8];
        for (i, byte) in data4.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&tail[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Guid {
            data1: u32::try_from(hex(groups[0])?).map_err(|_| bad())?,
            data2: u16::try_from(hex(groups[1])?).map_err(|_| bad())?,
            data3: u16::try_from(hex(groups[2])?).map_err(|_| bad())?,
            data4,
        })
    }
}

/// The bytes of `SOCKADDR_HV` for the guest port `port` of the VM `vm`.
pub fn sockaddr_hv(vm: &Guid, port: u32) -> [u8; SOCKADDR_HV_LEN] {
    let mut b = [0u8; SOCKADDR_HV_LEN];
    b[0..2].copy_from_slice(&AF_HYPERV.to_le_bytes());
    // b[2..4]: Reserved, zero.
    b[4..20].copy_from_slice(&vm.to_bytes());
    b[20..36].copy_from_slice(&Guid::vsock_service(port).to_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_ports_map_to_service_ids() {
        // go-winio's VsockServiceID(5000) and the value WSL users write by hand.
        assert_eq!(
            Guid::vsock_service(5000).to_string(),
            "00001388-facb-11e6-bd58-64006a7986d3"
        );
        assert_eq!(
            Guid::vsock_service(u32::MAX).to_string(),
            "ffffffff-facb-11e6-bd58-64006a7986d3"
        );
        assert_eq!(Guid::vsock_service(1024).vsock_port(), Some(1024));
        let other: Guid = "a42e7cda-d03f-480c-9cc2-a4de20abb878".parse().unwrap();
        assert_eq!(other.vsock_port(), None);
    }

    #[test]
    fn guids_parse_and_print() {
        let g: Guid = "{6E6F7465-2D77-696E-646F-77732D6A7573}".parse().unwrap();
        assert_eq!(g.to_string(), "6e6f7465-2d77-696e-646f-77732d6a7573");
        assert_eq!(g, g.to_string().parse().unwrap());
        for bad in [
            "",
            "6e6f7465-2d77-696e-646f",
            "6e6f7465-2d77-696e-646f-77732d6a757",
            "6e6f7465-2d77-696e-646f-77732d6a75733",
            "6e6f746g-2d77-696e-646f-77732d6a7573",
            "{6e6f7465-2d77-696e-646f-77732d6a7573",
            "+e6f7465-2d77-696e-646f-77732d6a7573",
            "6e6f7465-+d77-696e-646f-77732d6a7573",
        ] {
            assert!(bad.parse::<Guid>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn windows_byte_order() {
        let g = Guid::vsock_service(0x0102_0304);
        assert_eq!(
            g.to_bytes(),
            [
                0x04, 0x03, 0x02, 0x01, 0xCB, 0xFA, 0xE6, 0x11, 0xBD, 0x58, 0x64, 0x00, 0x6A, 0x79,
                0x86, 0xD3
            ]
        );
        let vm: Guid = "11223344-5566-7788-99aa-bbccddeeff00".parse().unwrap();
        let sa = sockaddr_hv(&vm, 5000);
        assert_eq!(&sa[0..4], &[34, 0, 0, 0]);
        assert_eq!(
            &sa[4..20],
            &[
                0x44, 0x33, 0x22, 0x11, 0x66, 0x55, 0x88, 0x77, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
                0xff, 0x00
            ]
        );
        assert_eq!(&sa[20..24], &5000u32.to_le_bytes());
        assert_eq!(&sa[24..36], &Guid::vsock_service(0).to_bytes()[4..]);
    }
}
