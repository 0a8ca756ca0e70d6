//! Publishing guest ports on the host (`run -p`): a host TCP listener
//! whose connections the agent opens to the guest's loopback over vsock.
//! It needs no guest network at all, and the guest never learns the
//! client's address (as with Docker's userland proxy).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use supermachine_host::{AsPollable, Interest, Poller, Trigger};

use crate::vm::AgentDialer;
use crate::{Error, Result, Vm, io_error};

/// Connections a published port queues before accepting them.
const LISTEN_BACKLOG: i32 = 4096;

/// `[HOST_IP:]HOST_PORT:GUEST_PORT` as `run -p` takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMapping {
    /// Where the host listens (default 0.0.0.0, as Docker does; port 0
    /// picks a free one).
    pub host: SocketAddr,
    /// The guest's TCP port (on its loopback).
    pub guest_port: u16,
}

impl std::str::FromStr for PortMapping {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("'{s}' is not [HOST_IP:]HOST_PORT:GUEST_PORT");
        let s_tcp = s.strip_suffix("/tcp").unwrap_or(s);
        if s_tcp.ends_with("/udp") {
            return Err(format!("'{s}': only TCP ports can be published"));
        }
        let (host_part, guest) = s_tcp.rsplit_once(':').ok_or_else(bad)?;
        let guest_port: u16 = guest.parse().map_err(|_| bad())?;
        if guest_port == 0 {
            return Err(format!("'{s}': guest port 0 is not a port"));
        }
        let (ip, host_port) = match host_part.rsplit_once(':') {
            Some((ip, port)) => {
                let ip = ip.trim_start_matches('[').trim_end_matches(']');
                (ip.parse().map_err(|_| bad())?, port)
            }
            None => (std::net::Ipv4Addr::UNSPECIFIED.into(), host_part),
        };
        let host_port: u16 = host_port.parse().map_err(|_| bad())?;
        Ok(PortMapping {
            host: SocketAddr::new(ip, host_port),
            guest_port,
        })
    }
}

impl PortMapping {
    /// Binds the host side now, so a port in use is reported before any
    /// VM starts.
    pub fn bind(&self) -> Result<TcpListener> {
        let listener = TcpListener::bind(self.host).map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => Error::InvalidOption(format!(
                "host port {} is already in use (-p {}:{})",
                self.host.port(),
                self.host,
                self.guest_port
            )),
            _ => io_error(format!("listening on {}", self.host))(e),
        })?;
        // Bursts of clients queue rather than meet resets: std listens
        // with a backlog of 128; the kernel caps this at somaxconn.
        rustix::net::listen(&listener, LISTEN_BACKLOG)
            .map_err(|e| io_error(format!("listening on {}", self.host))(e.into()))?;
        Ok(listener)
    }
}

/// A published port; dropping it stops accepting (open connections run
/// until either side closes them).
#[derive(Debug)]
pub struct PortForward {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl PortForward {
    /// The host address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

impl Vm {
    /// Serves `listener`'s connections from TCP port `guest_port` on the
    /// guest's loopback. A connection the guest refuses is closed.
    pub fn forward_port(&self, listener: TcpListener, guest_port: u16) -> Result<PortForward> {
        let local = listener
            .local_addr()
            .map_err(io_error("the port listener"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_error("the port listener"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let dialer = self.dialer();
        let acceptor = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("port-{}", local.port()))
                .spawn(move || accept_loop(&listener, guest_port, &dialer, &stop))
                .map_err(io_error("starting a thread"))?
        };
        Ok(PortForward {
            local,
            stop,
            acceptor: Some(acceptor),
        })
    }
}

fn accept_loop(listener: &TcpListener, guest_port: u16, dialer: &AgentDialer, stop: &AtomicBool) {
    // Woken by a connection, or every 100 ms to see whether to stop.
    let mut poller = match Poller::new().and_then(|poller| {
        poller.add(listener.as_pollable(), 0, Interest::READ, Trigger::Level)?;
        Ok(poller)
    }) {
        Ok(poller) => poller,
        Err(e) => {
            log::warn!("port {guest_port}: cannot wait for connections: {e}");
            return;
        }
    };
    let mut ready = Vec::new();
    let mut wait_readable = || {
        ready.clear();
        let _ = poller.wait(Some(std::time::Duration::from_millis(100)), &mut ready);
    };
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                let dialer = dialer.clone();
                let _ = std::thread::Builder::new()
                    .name("port-conn".into())
                    .spawn(move || serve(client, guest_port, &dialer));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors, say: back off rather than spin.
                log::warn!("accepting on {:?}: {e}", listener.local_addr());
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// Splices one client connection to the guest port until both directions
/// have ended. Each side's one descriptor serves both directions (no
/// clones): a burst of clients costs two descriptors each.
fn serve(client: TcpStream, guest_port: u16, dialer: &AgentDialer) {
    let _ = client.set_nonblocking(false);
    let _ = client.set_nodelay(true);
    let guest = match dialer.connect_tcp(guest_port) {
        Ok(g) => g,
        Err(e) => {
            log::debug!("port {guest_port}: {e}");
            return;
        }
    };
    let client = Arc::new(client);
    let guest = Arc::new(guest);
    let upstream = {
        let (client, guest) = (client.clone(), guest.clone());
        std::thread::Builder::new()
            .name("port-up".into())
            .spawn(move || {
                pump(&*client, &*guest);
                let _ = guest.shutdown(Shutdown::Write);
            })
    };
    match upstream {
        Ok(upstream) => {
            pump(&*guest, &*client);
            let _ = client.shutdown(Shutdown::Write);
            let _ = upstream.join();
        }
        Err(e) => log::warn!("port {guest_port}: starting a thread: {e}"),
    }
}

/// Copies until end of stream (or an error on either side).
fn pump(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_mappings_parse_like_docker() {
        let m: PortMapping = "8080:80".parse().unwrap();
        assert_eq!(m.host, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(m.guest_port, 80);
        let m: PortMapping = "127.0.0.1:0:8000/tcp".parse().unwrap();
        assert_eq!(m.host, "127.0.0.1:0".parse().unwrap());
        let m: PortMapping = "[::1]:9000:9000".parse().unwrap();
        assert_eq!(m.host, "[::1]:9000".parse().unwrap());
        for bad in [
            "80",
            "x:80",
            "8080:x",
            "8080:0",
            "1.2.3:80:80",
            "70000:80",
            "53:53/udp",
        ] {
            assert!(bad.parse::<PortMapping>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_port_in_use_is_named() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let mapping = PortMapping {
            host: taken.local_addr().unwrap(),
            guest_port: 80,
        };
        let e = mapping.bind().unwrap_err().to_string();
        assert!(e.contains("already in use"), "{e}");
    }
}
