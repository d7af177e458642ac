//! `hostnet-keygen DIR`: generates one side's key pair and self-signed certificate for the
//! `quic://` transport, as `DIR/cert.der` and `DIR/key.der` (mode 0600). Give `DIR/cert.der` to
//! the other side, which pins it. Refuses to overwrite an existing key.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        eprintln!("usage: hostnet-keygen DIR");
        return ExitCode::from(2);
    };
    if dir == "-h" || dir == "--help" {
        println!(
            "usage: hostnet-keygen DIR\n\nWrites DIR/cert.der and DIR/key.der (mode 0600) for the quic:// link \
             transport.\nGive DIR/cert.der to the peer, which pins it."
        );
        return ExitCode::SUCCESS;
    }
    let dir = PathBuf::from(dir);
    match hostnet_link::transport::keygen(&dir) {
        Ok(cert) => {
            let der = std::fs::read(&cert).unwrap_or_default();
            println!("certificate: {}", cert.display());
            println!(
                "key:         {}",
                dir.join(hostnet_link::transport::KEY_FILE).display()
            );
            println!(
                "sha256:      {}",
                hostnet_link::transport::fingerprint(&der)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hostnet-keygen: {e}");
            ExitCode::FAILURE
        }
    }
}
