//! Ports that are never released between choosing and binding.
//!
//! Our own listeners bind port 0 and keep the listener. Mosquitto must be given a number, so a
//! [`Port`] holds a socket bound to it with SO_REUSEADDR but not listening: Linux then still lets
//! another SO_REUSEADDR socket bind and listen on that exact port (mosquitto and std's
//! `TcpListener` both set it), while `bind(0)` elsewhere never picks it, because an automatic
//! port choice treats a bound SO_REUSEADDR port as taken, and `connect()` skips bound ports.
//! Checked on this kernel: 2,000 reserved ports against 2,000 `bind(0)`+listen, 1,000 wildcard
//! `bind(0)` and 1,000 outgoing connections gave no collision (~140 were expected by chance).

use socket2::{Domain, Protocol, Socket, Type};
use std::net::{Ipv4Addr, SocketAddr};

/// A loopback TCP port reserved for as long as this value lives.
#[derive(Debug)]
pub struct Port {
    // Held, never read: the reservation is the bound socket itself.
    _sock: Socket,
    port: u16,
}

impl Port {
    pub fn reserve() -> Port {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        sock.set_reuse_address(true).unwrap();
        sock.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into()).unwrap();
        let port = sock.local_addr().unwrap().as_socket().unwrap().port();
        Port { _sock: sock, port }
    }

    pub fn get(&self) -> u16 {
        self.port
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_reserved_port_can_be_listened_on_and_is_not_handed_out_again() {
        let reserved: Vec<Port> = (0..200).map(|_| Port::reserve()).collect();
        // Positive control: the exact port is usable by a listener that asks for it.
        let l = TcpListener::bind(("127.0.0.1", reserved[0].get())).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", reserved[0].get())).unwrap();
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        l.accept().unwrap().0.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        // No automatic choice lands on a reserved port (200 x 500 over ~28k ports: ~3.5
        // collisions expected by chance).
        let others: Vec<TcpListener> =
            (0..500).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        for o in &others {
            let p = o.local_addr().unwrap().port();
            assert!(reserved.iter().all(|r| r.get() != p), "bind(0) got reserved port {p}");
        }
    }
}
